"""The Clipper on FSDP2 (DTensor) parameters: 2 gloo ranks on the CPU (launcher in dist_workers)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import gradclip

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def clipper_fsdp2_worker(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 11), nn.Tanh(), nn.Linear(11, 3))
    ref = copy.deepcopy(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    clipper = gradclip.Clipper(model.named_parameters(), max_norm=0.05, per_param_norms=True, history=4)
    assert clipper.names == tuple(n for n, _ in ref.named_parameters())
    x = torch.randn(8, 13)
    for step in range(3):
        model.zero_grad()
        ref.zero_grad()
        (model(x) * (step + 1)).pow(2).sum().backward()
        (ref(x) * (step + 1)).pow(2).sum().backward()
        if step == 2:  # a None grad: zero norm, untouched, on every rank
            model[2].bias.grad = None
            ref[2].bias.grad = None
        exact = [
            0.0 if p.grad is None else torch.linalg.vector_norm(p.grad.double()).item()
            for p in ref.parameters()
        ]
        stats = clipper.clip_()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        torch.testing.assert_close(stats.total_norm, expected, rtol=2e-6, atol=0)
        assert not isinstance(stats.total_norm, torch.distributed.tensor.DTensor)
        torch.testing.assert_close(
            stats.per_param_norms.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-5, atol=1e-12
        )
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)
    assert clipper.history.snapshot()["steps"] == 3


def test_clipper_on_fsdp2_parameters_matches_torch_unsharded():
    import dist_workers

    dist_workers.launch(clipper_fsdp2_worker, 2)


def _fsdp1(strategy_name: str, use_orig_params: bool):
    """A small MLP under torch's FSDP1 on the CPU (nested: each Linear wrapped, then the root)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 37), nn.ReLU(), nn.Linear(37, 11), nn.Tanh(), nn.Linear(11, 3))
    return FSDP(
        model,
        device_id=torch.device("cpu"),
        sharding_strategy=ShardingStrategy[strategy_name],
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )


def clipper_fsdp1_worker(rank: int, world: int, strategy_name: str, use_orig_params: bool) -> None:
    fsdp = _fsdp1(strategy_name, use_orig_params)
    group = None if strategy_name == "NO_SHARD" else dist.group.WORLD
    clipper = gradclip.Clipper(
        fsdp.named_parameters(), max_norm=0.05, process_group=group, per_param_norms=True
    )
    torch.manual_seed(1 + rank)  # each rank its own batch, as data parallel training has
    for step in range(2):
        fsdp.zero_grad()
        (fsdp(torch.randn(8, 13)) * (step + 1)).pow(2).sum().backward()
        params = list(fsdp.parameters())
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        expected = fsdp.clip_grad_norm_(0.05)  # torch's FSDP1 clipping, on its own copy
        torch_grads = [None if p.grad is None else p.grad.clone() for p in params]
        for p, g in zip(params, saved, strict=True):
            p.grad = g
        stats = clipper.clip_()
        torch.testing.assert_close(stats.total_norm, expected, rtol=2e-6, atol=0)
        for p, g in zip(params, torch_grads, strict=True):
            assert (p.grad is None) == (g is None)
            if g is not None:
                torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        # The check can fail: this rank's shards alone give another norm.
        if group is not None:
            local = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in saved if g is not None])
            )
            assert not torch.allclose(local, expected, rtol=1e-3)


@pytest.mark.parametrize(
    "strategy_name, use_orig_params",
    [("FULL_SHARD", True), ("FULL_SHARD", False), ("SHARD_GRAD_OP", True), ("NO_SHARD", False)],
)
def test_clipper_with_a_process_group_matches_torch_fsdp1(strategy_name, use_orig_params):
    """FSDP1 (Lightning's FSDPStrategy) holds plain local shards: the Clipper's process_group makes
    the norm global, equal to FullyShardedDataParallel.clip_grad_norm_."""
    import dist_workers

    dist_workers.launch(clipper_fsdp1_worker, 2, strategy_name, use_orig_params)


def clipper_empty_rank_worker(rank: int, world: int) -> None:
    """A rank without gradients (a pipeline stage that got none) still takes part in the collective."""
    torch.manual_seed(0)
    mine = [nn.Parameter(torch.zeros(5)) for _ in range(3)]
    if rank == 0:
        for p in mine:
            p.grad = torch.randn(5)
    clipper = gradclip.Clipper(mine, max_norm=1e-3, process_group=dist.group.WORLD)
    expected = torch.zeros(()) if rank else torch.nn.utils.get_total_norm([p.grad for p in mine])
    dist.broadcast(expected, 0)
    stats = clipper.clip_()
    torch.testing.assert_close(stats.total_norm, expected, rtol=2e-6, atol=0)


def test_clipper_rank_without_gradients_does_not_hang():
    import dist_workers

    dist_workers.launch(clipper_empty_rank_worker, 2)
