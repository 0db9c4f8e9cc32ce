"""Multi-process helpers for tests/test_distributed.py: a launcher, a collective counter, workers.

Workers run in processes started with torch.multiprocessing (spawn), one gloo process group per
test on a free localhost port. Each worker builds the same full gradients on every rank from a
seed, so the single-process fp64 reference is computed locally on every rank.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradclip

INF = math.inf
# Norm and clipped-gradient tolerance against the fp64 reference (fp32 gradients; the local norms
# are fp32 before the fp64 reduction, and the reference below is fp64 throughout).
NORM_RTOL = 2e-6
GRAD_TOL = dict(rtol=2e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------ launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if getattr(fn, "uses_nccl", False) else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Passed: leave without running destructors. On a loaded 2-core machine a rank sometimes
    # aborted in teardown after its work was done ("terminate called without an active
    # exception", SIGABRT), failing a passing test. Every rank has passed the barrier above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch(fn, world_size: int, *args, timeout: float = 110.0) -> None:
    """Run fn(rank, world_size, *args) on `world_size` spawned ranks; re-raise a rank's error.

    Retried once on a fresh port if the free port was taken between probing and binding."""
    try:
        _launch(fn, world_size, args, timeout)
    except mp.ProcessRaisedException as exc:
        if "EADDRINUSE" not in str(exc) and "Address already in use" not in str(exc):
            raise
        _launch(fn, world_size, args, timeout)


def _launch(fn, world_size: int, args: tuple, timeout: float) -> None:
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s")


# ------------------------------------------------------------------------------ collective counter
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "scatter",
    "gather",
    "barrier",
)


@contextlib.contextmanager
def count_collectives():
    """Count every collective issued in the block: torch.distributed's Python entry points (what
    gradclip calls) plus, through CommDebugMode, the c10d/functional ops DTensor uses internally."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts = {"python": 0, "dispatch": 0}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def wrap(original):
        def counted(*args, **kwargs):
            counts["python"] += 1
            return original(*args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(dist, name, wrap(original))
    mode = CommDebugMode()
    try:
        with mode:
            yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
        counts["dispatch"] = mode.get_total_counts()


# ------------------------------------------------------------------------------------ references
def fp64_norm(tensors, norm_type: float) -> float:
    flat = torch.cat([t.detach().double().flatten() for t in tensors]) if tensors else torch.zeros(0)
    return float(torch.linalg.vector_norm(flat, norm_type))


def expected_clip(full, max_norm: float, norm: float):
    coef = min(max_norm / (norm + 1e-6), 1.0)
    return [(g.double() * coef).float() for g in full]


def assert_same_on_every_rank(value: torch.Tensor) -> None:
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.contiguous())
    for other in gathered:
        assert torch.equal(other, value) or (other.isnan().all() and value.isnan().all()), (gathered, value)


def check_norm(total: torch.Tensor, expected: float) -> None:
    assert type(total) is torch.Tensor and total.dim() == 0 and total.dtype == torch.float32, total
    torch.testing.assert_close(
        total.double(), torch.tensor(expected, dtype=torch.float64), rtol=NORM_RTOL, atol=0
    )


def _param(local_or_dtensor: torch.Tensor) -> nn.Parameter:
    p = nn.Parameter(torch.zeros_like(local_or_dtensor))
    p.grad = local_or_dtensor
    return p


# ------------------------------------------------------------------------------------ FSDP2 model
def _mlp() -> nn.Sequential:
    # Odd sizes: uneven shards, and on 4 ranks some ranks hold empty shards.
    return nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 11), nn.Tanh(), nn.Linear(11, 3))


def fsdp2_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = _mlp()
    ref = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(8, 13)  # the same batch on every rank: FSDP's averaged grads equal ref's

    for norm_type in (2.0, 1.0, INF):
        for clipping in (True, False):
            model.zero_grad()
            ref.zero_grad()
            model(x).pow(2).sum().backward()
            ref(x).pow(2).sum().backward()
            full = [p.grad.full_tensor().clone() for p in model.parameters()]
            ref_grads = [p.grad for p in ref.parameters()]
            torch.testing.assert_close(full, ref_grads, rtol=1e-5, atol=1e-6)
            expected = fp64_norm(full, norm_type)
            max_norm = 0.5 * expected if clipping else 2.0 * expected
            before = [p.grad._local_tensor.clone() for p in model.parameters()]

            assert (
                gradclip.get_total_norm([p.grad for p in model.parameters()], norm_type).dtype
                == torch.float32
            )
            with count_collectives() as counts:
                total = gradclip.clip_grad_norm_(model.parameters(), max_norm, norm_type)
            assert counts == {"python": 1, "dispatch": 1}, counts  # one all_reduce, nothing else
            check_norm(total, expected)
            assert_same_on_every_rank(total)

            clipped = [p.grad.full_tensor() for p in model.parameters()]
            torch.testing.assert_close(clipped, expected_clip(full, max_norm, expected), **GRAD_TOL)
            if not clipping:  # bit-identical local shards when the coefficient clamps to 1
                for b, p in zip(before, model.parameters(), strict=True):
                    assert torch.equal(b, p.grad._local_tensor)
            # The single-process torch reference on the unsharded model agrees too.
            torch_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm, norm_type)
            torch.testing.assert_close(total, torch_total, rtol=1e-5, atol=0)
            torch.testing.assert_close(clipped, [p.grad for p in ref.parameters()], rtol=1e-5, atol=1e-6)

    # The two-step API and clip_grad_value_ take DTensor grads too (they act on the local shards).
    model.zero_grad()
    model(x).pow(2).sum().backward()
    full = [p.grad.full_tensor().clone() for p in model.parameters()]
    expected = fp64_norm(full, 2.0)
    with count_collectives() as counts:
        norm = gradclip.get_total_norm([p.grad for p in model.parameters()])
        gradclip.clip_grads_with_norm_(model.parameters(), 0.5 * expected, norm)
    assert counts["python"] == 1, counts
    check_norm(norm, expected)
    clipped = [p.grad.full_tensor() for p in model.parameters()]
    torch.testing.assert_close(clipped, expected_clip(full, 0.5 * expected, expected), **GRAD_TOL)
    gradclip.clip_grad_value_(model.parameters(), 0.01)
    clamped = [p.grad.full_tensor() for p in model.parameters()]
    torch.testing.assert_close(clamped, [g.clamp(-0.01, 0.01) for g in clipped], rtol=0, atol=0)


# ---------------------------------------------------------------------- tensor parallel, 2-D mesh
def _dtensor_grads(layouts, seed: int):
    """(full grads, DTensor grads) for [(mesh, placements, shape)], the same on every rank."""
    from torch.distributed.tensor import distribute_tensor

    gen = torch.Generator().manual_seed(seed)
    full, sharded = [], []
    for mesh, placements, shape in layouts:
        g = torch.randn(shape, generator=gen) * (1 + len(full))
        full.append(g)
        sharded.append(distribute_tensor(g.clone(), mesh, placements, src_data_rank=None))
    return full, sharded


def tp_layout_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    assert world == 4
    mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    mesh1 = init_device_mesh("cpu", (4,))  # a second mesh: torch crashes on this (pytorch#180346)
    layouts = [
        (mesh2, [Shard(0), Shard(1)], (6, 10)),  # FSDP x TP 2-D sharded weight
        (mesh2, [Shard(0), Replicate()], (5, 3)),  # TP-replicated, FSDP-sharded (uneven)
        (mesh2, [Replicate(), Shard(0)], (7,)),  # TP-sharded, DP-replicated
        (mesh2, [Replicate(), Replicate()], (4, 4)),  # replicated everywhere: counted once
        (mesh2["tp"], [Shard(1)], (3, 8)),  # a 1-D submesh sharing the tp group
        (mesh2["dp"], [Replicate()], (2,)),
        (mesh1, [Shard(0)], (9, 2)),
        (mesh1, [Replicate()], (3,)),
    ]
    distinct_groups = {id(g) for g in (mesh2.get_group(0), mesh2.get_group(1), mesh1.get_group(0))}
    for norm_type in (2.0, 1.0, INF, 3.0):
        full, grads = _dtensor_grads(layouts, seed=int(norm_type) if norm_type != INF else 99)
        params = [_param(g) for g in grads]
        expected = fp64_norm(full, norm_type)
        assert isinstance(params[0].grad, DTensor)
        with count_collectives() as counts:
            norm = gradclip.get_total_norm(grads, norm_type)
            total = gradclip.clip_grad_norm_(params, 0.25 * expected, norm_type)
        assert counts["python"] == counts["dispatch"] == 2 * len(distinct_groups), counts
        assert torch.equal(norm, total)
        check_norm(total, expected)
        assert_same_on_every_rank(total)
        clipped = [p.grad.full_tensor() for p in params]
        torch.testing.assert_close(clipped, expected_clip(full, 0.25 * expected, expected), **GRAD_TOL)

    # Partial gradients (unreduced sums over tp): exact, at one extra collective per such tensor.
    gen = torch.Generator().manual_seed(7)
    parts = [torch.randn(4, 6, generator=gen) for _ in range(2)]  # tp rank j holds parts[j]
    dp, tp = mesh2.get_local_rank("dp"), mesh2.get_local_rank("tp")
    local = parts[tp].chunk(2)[dp].clone()
    partial = DTensor.from_local(local, mesh2, [Shard(0), Partial()], run_check=False)
    full, grads = _dtensor_grads(layouts[:3], seed=5)
    params = [_param(g) for g in grads] + [_param(partial)]
    expected = fp64_norm(full + [parts[0] + parts[1]], 2.0)
    with count_collectives() as counts:
        total = gradclip.clip_grad_norm_(params, 0.5 * expected, 2.0)
    assert counts["dispatch"] == 3, counts  # dp and tp groups, plus one redistribute of the Partial grad
    check_norm(total, expected)
    coef = 0.5 * expected / (expected + 1e-6)
    torch.testing.assert_close(params[-1].grad._local_tensor, parts[tp].chunk(2)[dp] * coef, **GRAD_TOL)


# ---------------------------------------------------------------------------- many DTensor params
def many_params_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    seconds = {}
    for n in (500, 4000):
        full, grads = _dtensor_grads([(mesh, [Shard(0)], (3,))] * n, seed=n)
        params = [_param(g) for g in grads]
        expected = fp64_norm(full, 2.0)
        gradclip.clip_grad_norm_(params, 1e9, 2.0)  # warm-up
        times = []
        for _ in range(3):  # the best of three: the CPU is shared with the other rank
            dist.barrier()
            start = time.perf_counter()
            gradclip.clip_grad_norm_(params, 1e9, 2.0)
            times.append(time.perf_counter() - start)
        seconds[n] = min(times)
        with count_collectives() as counts:
            total = gradclip.clip_grad_norm_(params, 1e9, 2.0)
        assert counts == {"python": 1, "dispatch": 1}, counts
        check_norm(total, expected)
    # Linear: 8x the parameters in well under 64x (quadratic) the time; generous for a shared CPU.
    ratio = seconds[4000] / seconds[500]
    assert ratio < 24, (seconds, ratio)


# ------------------------------------------------------------------------------ pipeline pieces
def _pieces(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1 + (7 * i) % 11, 3, generator=gen) * (i + 1) for i in range(n)]


def pipeline_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    assert world == 4
    # (a) a 4-stage pipeline over WORLD: stage r holds tensors r, r + 4, ...; stage 3 holds none.
    full = _pieces(9, seed=1)
    mine = [i for i in range(len(full)) if i % 3 == rank] if rank < 3 else []
    for norm_type in (2.0, 1.0, INF):
        params = [_param(full[i].clone()) for i in mine]
        expected = fp64_norm(full, norm_type)
        with count_collectives() as counts:
            norm = gradclip.get_total_norm(
                [p.grad for p in params], norm_type, process_group=dist.group.WORLD
            )
            total = gradclip.clip_grad_norm_(
                params, 0.5 * expected, norm_type, process_group=dist.group.WORLD
            )
        assert counts == {"python": 2, "dispatch": 2}, counts
        check_norm(total, expected)
        assert torch.equal(norm, total)
        assert_same_on_every_rank(total)
        want = expected_clip(full, 0.5 * expected, expected)
        torch.testing.assert_close([p.grad for p in params], [want[i] for i in mine], **GRAD_TOL)

    # (b) two independent 2-stage pipelines, {0, 1} and {2, 3}, each its own model.
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pipe, stage = divmod(rank, 2)
    full = _pieces(6, seed=10 + pipe)
    mine = full[stage * 3 : stage * 3 + 3]
    params = [_param(g.clone()) for g in mine]
    expected = fp64_norm(full, 2.0)
    with count_collectives() as counts:
        total = gradclip.clip_grad_norm_(params, 0.5 * expected, process_group=groups[pipe])
    assert counts["python"] == 1, counts
    check_norm(total, expected)
    want = expected_clip(full, 0.5 * expected, expected)[stage * 3 : stage * 3 + 3]
    torch.testing.assert_close([p.grad for p in params], want, **GRAD_TOL)

    # (c) pipeline x FSDP: a (pp=2, dp=2) mesh; each stage's params are Shard(0) DTensors on its dp
    # submesh, and process_group is the pp group: one collective per group, two in all.
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_local_rank("pp")
    layouts = [(mesh["dp"], [Shard(0)], (5 + i, 4)) for i in range(3)]
    stage_full = [_dtensor_grads(layouts, seed=20 + s)[0] for s in range(2)]
    _, grads = _dtensor_grads(layouts, seed=20 + stage)
    params = [_param(g) for g in grads]
    expected = fp64_norm(stage_full[0] + stage_full[1], 2.0)
    with count_collectives() as counts:
        total = gradclip.clip_grad_norm_(params, 0.5 * expected, process_group=mesh.get_group("pp"))
    assert counts == {"python": 2, "dispatch": 2}, counts
    check_norm(total, expected)
    assert_same_on_every_rank(total)
    torch.testing.assert_close(
        [p.grad.full_tensor() for p in params],
        expected_clip(stage_full[stage], 0.5 * expected, expected),
        **GRAD_TOL,
    )


# --------------------------------------------------------------------------------------------- DDP
def ddp_worker(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = _mlp()
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    xs = torch.randn(world, 8, 13)
    ddp(xs[rank]).pow(2).sum().backward()  # DDP averages the grads over ranks during backward
    sum(ref(x).pow(2).sum() for x in xs).div(world).backward()
    for norm_type in (2.0, INF):
        expected = fp64_norm([p.grad for p in ddp.parameters()], norm_type)
        with count_collectives() as counts:
            total = gradclip.clip_grad_norm_(ddp.parameters(), 0.5 * expected, norm_type)
        assert counts == {"python": 0, "dispatch": 0}, counts  # the local norm is the global one
        check_norm(total, expected)
        torch_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * expected, norm_type)
        torch.testing.assert_close(total, torch_total, rtol=1e-5, atol=0)
        assert_same_on_every_rank(total)


# --------------------------------------------------------------------------------- non-finite grads
def nonfinite_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    bad_rank = world - 1
    for bad in (math.nan, math.inf):
        for norm_type in (2.0, 1.0, INF, 3.0):
            for route in ("dtensor", "process_group"):
                if route == "dtensor":
                    _, grads = _dtensor_grads([(mesh, [Shard(0)], (world * 2, 3))] * 3, seed=3)
                    if rank == bad_rank:
                        grads[1]._local_tensor[0, 1] = bad
                    kwargs = {}
                else:
                    grads = _pieces(3, seed=rank)
                    if rank == bad_rank:
                        grads[2][0, 0] = bad
                    kwargs = {"process_group": dist.group.WORLD}
                # Huge finite values elsewhere, so a MAX reduction that dropped the NaN would show.
                if rank != bad_rank:
                    local = grads[0]._local_tensor if route == "dtensor" else grads[0]
                    local.view(-1)[0] = 3e38
                params = [_param(g) for g in grads]
                total = gradclip.clip_grad_norm_(params, 1.0, norm_type, **kwargs)
                want_nan = math.isnan(bad)
                assert total.isnan().item() if want_nan else (total.isinf().item() and total > 0), (
                    bad,
                    total,
                )
                assert_same_on_every_rank(total)
                # error_if_nonfinite raises on every rank, before touching a gradient.
                params = [_param(g.clone() if route != "dtensor" else g) for g in grads]
                locals_before = [
                    (p.grad._local_tensor if route == "dtensor" else p.grad).clone() for p in params
                ]
                raised = False
                try:
                    gradclip.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True, **kwargs)
                except RuntimeError as exc:
                    raised = "non-finite" in str(exc)
                assert raised
                for b, p in zip(locals_before, params, strict=True):
                    after = p.grad._local_tensor if route == "dtensor" else p.grad
                    assert torch.equal(b.nan_to_num(), after.nan_to_num())


# ----------------------------------------------------------------------------- world size 1 (GPU)
def world1_worker(rank: int, world: int, device_type: str) -> None:
    """The DTensor path on one rank: a smoke test, and on CUDA the NCCL path."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device_type, (1,))
    torch.manual_seed(0)
    model = _mlp().to(device)
    ref = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(8, 13, device=device)
    for norm_type in (2.0, 1.0, INF):
        model.zero_grad()
        ref.zero_grad()
        model(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        full = [p.grad.full_tensor().clone() for p in model.parameters()]
        expected = fp64_norm(full, norm_type)
        with count_collectives() as counts:
            total = gradclip.clip_grad_norm_(model.parameters(), 0.5 * expected, norm_type)
        assert counts["python"] == 0, counts  # a mesh dim of size 1 reduces nothing
        assert total.device == device
        torch.testing.assert_close(
            total.double().cpu(), torch.tensor(expected, dtype=torch.float64), rtol=NORM_RTOL, atol=0
        )
        clipped = [p.grad.full_tensor() for p in model.parameters()]
        torch.testing.assert_close(clipped, expected_clip(full, 0.5 * expected, expected), **GRAD_TOL)
    # A process_group of one rank: one (trivial) collective through the real backend.
    params = [_param(torch.randn(5, device=device)) for _ in range(3)]
    expected = fp64_norm([p.grad for p in params], 2.0)
    total = gradclip.clip_grad_norm_(params, 0.5 * expected, process_group=dist.group.WORLD)
    torch.testing.assert_close(
        total.double().cpu(), torch.tensor(expected, dtype=torch.float64), rtol=NORM_RTOL, atol=0
    )


def world1_nccl_worker(rank: int, world: int) -> None:
    world1_worker(rank, world, "cuda")


world1_nccl_worker.uses_nccl = True


# ------------------------------------------------------------------- per-parameter norms (issue 14)
def _full_norms(full, norm_type: float) -> torch.Tensor:
    return torch.tensor([fp64_norm([g], norm_type) if g.numel() else 0.0 for g in full], dtype=torch.float64)


def per_param_worker(rank: int, world: int) -> None:
    """Per-parameter norms across 2 ranks: the norm of each FULL parameter, identical on every rank,
    from the same one collective per process group as the total; NaN/inf localised to its entry."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from gradclip import distributed

    assert world == 2
    mesh = init_device_mesh("cpu", (world,))
    layouts = [
        (mesh, [Shard(0)], (7, 3)),  # uneven shards
        (mesh, [Replicate()], (4,)),  # replicated: not summed over the ranks
        (mesh, [Shard(1)], (2, 5)),
        (mesh, [Shard(0)], (1, 3)),  # rank 1 holds an empty shard
        (mesh, [Shard(0)], (0,)),  # empty everywhere
    ]
    for norm_type in (2.0, 1.0, INF, 3.0):
        full, grads = _dtensor_grads(layouts, seed=11)
        plain = torch.randn(6, generator=torch.Generator().manual_seed(5))  # the same on every rank
        tensors = [*grads[:2], plain, *grads[2:]]
        want = _full_norms([*full[:2], plain, *full[2:]], norm_type)
        with count_collectives() as counts:
            per_param = gradclip.per_param_norms(tensors, norm_type)
        assert counts == {"python": 1, "dispatch": 1}, counts  # the one all_reduce of the total
        assert type(per_param) is torch.Tensor and per_param.dtype == torch.float32, per_param
        torch.testing.assert_close(per_param.double(), want, rtol=NORM_RTOL, atol=0)
        assert_same_on_every_rank(per_param)
        total, again = distributed.per_param_norms(tensors, norm_type, "auto")
        assert torch.equal(again, per_param)
        assert torch.equal(total, gradclip.get_total_norm(tensors, norm_type))  # the total, bitwise

        # The clip variant: the same gradients as clip_grad_norm_, norms from before clipping.
        _, theirs = _dtensor_grads(layouts, seed=11)
        with count_collectives() as counts:
            total, per_param = distributed.clip_grad_norm_per_param_(grads, 0.3, norm_type, "auto")
        assert counts["python"] == 1, counts
        expected_total = gradclip.clip_grad_norm_([_param(g) for g in theirs], 0.3, norm_type)
        assert torch.equal(total, expected_total)
        torch.testing.assert_close(per_param.double(), _full_norms(full, norm_type), rtol=NORM_RTOL, atol=0)
        for ours, ref in zip(grads, theirs, strict=True):
            assert torch.equal(ours._local_tensor, ref._local_tensor)

    # process_group (pipeline stages): each rank's own tensors, not summed over the group; with
    # DTensors sharded over the mesh as well, their entries are reduced over the mesh group only.
    # Two distinct groups: two collectives, as for the total.
    pieces = _pieces(4, seed=rank)  # different tensors on each rank
    with count_collectives() as counts:
        per_param = gradclip.per_param_norms(pieces, 2.0, process_group=dist.group.WORLD)
    assert counts["python"] == 1, counts
    torch.testing.assert_close(per_param.double(), _full_norms(pieces, 2.0), rtol=NORM_RTOL, atol=0)
    total, _ = distributed.per_param_norms(pieces, 2.0, "auto", dist.group.WORLD)
    assert torch.equal(total, gradclip.get_total_norm(pieces, 2.0, process_group=dist.group.WORLD))
    pipeline = dist.new_group([0, 1])
    full, grads = _dtensor_grads(layouts[:3], seed=12)
    with count_collectives() as counts:
        per_param = gradclip.per_param_norms([*grads, *pieces], 2.0, process_group=pipeline)
    assert counts["python"] == 2, counts
    want = _full_norms([*full, *pieces], 2.0)
    torch.testing.assert_close(per_param.double(), want, rtol=NORM_RTOL, atol=0)

    # Non-finite values in one rank's shard: that parameter's entry only, on every rank.
    for bad in (math.nan, math.inf):
        for norm_type in (2.0, INF):
            full, grads = _dtensor_grads(layouts[:3], seed=13)
            if rank == 1:
                grads[0]._local_tensor[0, 0] = bad
            else:
                grads[0]._local_tensor[0, 0] = 3e38  # a MAX that dropped the NaN would show 3e38
            per_param = gradclip.per_param_norms(grads, norm_type)
            gathered = [torch.empty_like(per_param) for _ in range(world)]
            dist.all_gather(gathered, per_param)
            assert all(torch.equal(g.isnan(), per_param.isnan()) for g in gathered), gathered
            assert all(torch.equal(g.nan_to_num(), per_param.nan_to_num()) for g in gathered), gathered
            assert (per_param[0].isnan() if math.isnan(bad) else per_param[0].isinf()).item(), per_param
            assert per_param[1:].isfinite().all(), per_param

    # A Partial gradient (unreduced): the norm of its reduced sum, at one redistribute more.
    gen = torch.Generator().manual_seed(7)
    parts = [torch.randn(4, 6, generator=gen) for _ in range(world)]
    partial = DTensor.from_local(parts[rank].clone(), mesh, [Partial()], run_check=False)
    full, grads = _dtensor_grads(layouts[:1], seed=14)
    with count_collectives() as counts:
        per_param = gradclip.per_param_norms([grads[0], partial], 2.0)
    assert counts["dispatch"] == 2, counts
    want = _full_norms([full[0], parts[0] + parts[1]], 2.0)
    torch.testing.assert_close(per_param.double(), want, rtol=NORM_RTOL, atol=0)
