"""The Triton backend: implements the `gradclip::triton_*` ops for the CUDA and CPU dispatch keys.

Importing this module registers the implementations (gradclip/backends.py imports it lazily). CPU
tensors run the same kernel code under the Triton interpreter, a test tool: only in a process
where TRITON_INTERPRET=1 was set before triton was imported (triton fixes the flavour of every
@triton.jit function at import); CUDA tensors only in a process where it was not.

Guarantees, per op call on the gradients of one device (fp32/fp16/bf16, mixed; p in {1, 2, inf}):
- GPU: one kernel launch (`clip_grad_norm_`, `total_norm`, `clip_grads_with_norm_` with an fp32
  or lower `total_norm`, `clip_grad_value_`), no host synchronisation once the tensor table of this
  exact set of gradients is cached (building it synchronises once), and then no host-to-device
  copy and no allocation except the returned 0-dim norm (and, on a stream's first call, that
  stream's 8P + 4 bytes of scratch): safe to capture in a CUDA graph after one warm-up call (a
  call that misses the cache while capturing runs the reference instead: building a table is not
  capturable). An fp64 `total_norm` given to `clip_grads_with_norm_` runs torch's own fp64
  coefficient and `_foreach_mul_` (the reference), as torch and the CUDA backend keep fp64 there.
- The norm is a 0-dim fp32 tensor on the gradients' device, accumulated in fp64 (see
  triton_kernels/clip_grad_norm.py), bitwise reproducible, within the tolerance of the fp64
  reference; NaN/inf propagate as in torch. When the clip coefficient clamps to 1 no gradient is
  written.
- Gradients must be dense (contiguous, or any non-overlapping dense layout such as channels_last:
  the kernels treat each one as `numel` consecutive elements). If any gradient is not dense the
  whole op runs the reference implementation instead (correct, not fused); so do empty inputs.

Tensor table (int64, on the device, one per distinct tuple of (data_ptr, numel, dtype)):

    [0T, 1T)  address of each gradient's first element (data_ptr)
    [1T, 2T)  numel
    [2T, 3T)  tag: dtype (0 fp32, 1 fp16, 2 bf16) | 4 if the address is 16-byte aligned
    [3T, 4T)  first chunk of the tensor (exclusive prefix sum of cdiv(numel, BLOCK))
    [4T, 4T + 2P)  per program p: first and last tensor its chunks lie in

Program p owns chunks [p*C//P, (p+1)*C//P) of the C chunks (BLOCK elements, never spanning two
tensors), so the work is split evenly whatever the tensor sizes, and a per-tensor result (per-
parameter norms) can later be added by the program owning the tensor's chunks. The cache entry
also holds, per CUDA stream that launched on it, the fp64 partial slots and the never-reset
barrier counter, so nothing is allocated or copied on a cache hit; entries used while a CUDA graph
was being captured are never evicted.

Streams (review fixes):
- Cold path: a new table is copied to the device with a blocking copy (the host waits for the
  current stream, once, as the CUDA binding does), so a first launch on any stream reads a filled
  table.
- The table is shared by every stream; a stream other than the one it was allocated on is recorded
  on it (`record_stream`, once per stream), so evicting the entry never frees memory a kernel on
  another stream still reads.
- The partial slots and the barrier counter are per stream, allocated and zeroed on the stream
  that uses them (stream order makes them ready; no sync), so launches on two streams never share
  a counter. Work on one stream is ordered, so one entry can serve eager calls on one stream and a
  graph replayed beside them. A call captured into a CUDA graph gets scratch of its own, zeroed
  inside the graph at each replay (a 4-byte memset node), so two graphs never share a counter.
- GRADCLIP_DEBUG=1 (or `triton_backend.DEBUG = True`) checks before every norm launch that the
  counter's low 31 bits are 0 (the barrier's invariant; a launch killed midway would break it for
  good) and raises naming the fix; it reads the counter on the host, so it synchronises.
"""

from __future__ import annotations

import collections
import functools
import importlib
import math
import os
import threading
from dataclasses import dataclass, field

import torch
import triton
from torch import Tensor

from gradclip import _extension, reference

# Elements per chunk, warps per program and programs per SM on the GPU. The GPU grid of the fused
# kernel must be co-resident (grid barrier): it is launched cooperatively with <= 2 programs/SM.
BLOCK = 4096
NUM_WARPS = 8
PROGRAMS_PER_SM = 2
_MAX_REGS = 65536 // (PROGRAMS_PER_SM * NUM_WARPS * 32)  # registers/thread that keep them co-resident
# The interpreter runs programs one after another: a small grid keeps the tests fast.
INTERPRETER_PROGRAMS = 4
# Rescale walks each program's chunks last-first (the chunks read last are likeliest still in L2).
REVERSE_RESCALE = True
CACHE_SIZE = 16

_NORM_CODE = {2.0: 2, 1.0: 1, math.inf: 0}
_DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALIGNED16 = 4

_config = {"block": BLOCK, "num_programs": None}
# Checks that cost a host sync (the barrier counter's invariant); off by default.
DEBUG = os.environ.get("GRADCLIP_DEBUG", "0") == "1"


def configure(block: int | None = None, num_programs: int | None = None) -> None:
    """Override the chunk size (a power of two) and the grid size (None: per device); for tests.

    Clears the table cache. `configure()` restores the defaults.
    """
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if num_programs is not None and num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    _config["block"] = block or BLOCK
    _config["num_programs"] = num_programs
    _cache.clear()


# --- kernels -----------------------------------------------------------------------------------


@functools.cache
def interpreting() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1: its kernels run on CPU tensors then.

    `@triton.jit` (triton.language's own functions included) picks interpreted or compiled when it
    is imported, so one process is one or the other: setting the variable later changes nothing.
    """
    import triton.language as tl  # noqa: PLC0415

    return type(tl.zeros).__name__ == "InterpretedFunction"


def _kernel(name: str, device: torch.device):
    """The @triton.jit kernel `name` of gradclip.triton_kernels, checked to suit `device`."""
    interpret = interpreting()
    if (device.type == "cpu") != interpret:
        if interpret:
            raise RuntimeError(
                f"the triton backend cannot run {device.type} tensors in a process where triton was imported "
                "with TRITON_INTERPRET=1 (the interpreter serves CPU tensors); fix: unset TRITON_INTERPRET"
            )
        raise RuntimeError(
            "the triton backend runs CPU tensors only under the Triton interpreter, and triton was imported "
            "without TRITON_INTERPRET=1; fix: set TRITON_INTERPRET=1 before anything imports triton"
        )
    kernel = _kernels.get(name)
    if kernel is None:
        kernel = _kernels[name] = getattr(
            importlib.import_module(f"gradclip.triton_kernels.{name}"), f"{name}_kernel"
        )
    return kernel


_kernels: dict[str, object] = {}


# --- the cached tensor table -----------------------------------------------------------------------


@dataclass
class _Scratch:
    """Per-stream launch state of one table: never shared between two streams."""

    partials: Tensor  # fp64 [P], one slot per program, NaN-poisoned when made
    sync: Tensor  # int32 [1], barrier counter, zero when made, never reset


@dataclass
class _Table:
    """Everything a launch needs for one set of gradients, resident on their device."""

    table: Tensor  # int64, layout in the module docstring; read-only once built
    num_tensors: int
    total_chunks: int
    num_programs: int
    p_pow2: int
    arrive_first: int  # program 0's barrier increment: 2^31 - (P - 1), as an int32
    interpret: bool
    home_stream: int  # stream_id the table was allocated on (0 for CPU tensors)
    scratch: dict = field(default_factory=dict)  # stream_id -> _Scratch
    recorded: set = field(default_factory=set)  # streams recorded on `table`
    graph_scratch: list = field(default_factory=list)  # scratch made while capturing (kept alive)
    captured: bool = False

    # The current stream's scratch (compatibility: tests and callers read entry.partials / .sync).
    @property
    def partials(self) -> Tensor:
        return _scratch(self).partials

    @property
    def sync(self) -> Tensor:
        return _scratch(self).sync


_cache: collections.OrderedDict = collections.OrderedDict()
# Guards _cache and each entry's scratch/recorded: an OrderedDict mutated (move_to_end, insert,
# evict) in one thread while another iterates it in the eviction loop raises "mutated during
# iteration". (Review fix.)
_cache_lock = threading.Lock()
_sm_count: dict[int, int] = {}


def _grid_size(device: torch.device, total_chunks: int) -> int:
    if _config["num_programs"] is not None:
        programs = _config["num_programs"]
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _sm_count:
            _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
        programs = PROGRAMS_PER_SM * _sm_count[index]
    else:
        programs = INTERPRETER_PROGRAMS
    return max(1, min(programs, total_chunks))


def _stream_of(device: torch.device):
    """(stream_id, stream) the next launch on `device` goes to; (0, None) for CPU tensors."""
    if device.type != "cuda":
        return 0, None
    stream = torch.cuda.current_stream(device)
    return stream.stream_id, stream


def _build(grads: list[Tensor], device: torch.device) -> _Table:
    block = _config["block"]
    ptrs = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    numels = torch.tensor([g.numel() for g in grads], dtype=torch.int64)
    tags = torch.tensor([_DTYPE_TAG[g.dtype] for g in grads], dtype=torch.int64)
    tags |= torch.where(ptrs % 16 == 0, _ALIGNED16, 0)
    chunk_end = torch.cumsum((numels + block - 1) // block, 0)
    total_chunks = int(chunk_end[-1])
    programs = _grid_size(device, total_chunks)
    bounds = torch.arange(programs + 1, dtype=torch.int64) * total_chunks // programs
    first = torch.searchsorted(chunk_end, bounds[:-1], right=True)
    last = torch.searchsorted(chunk_end, (bounds[1:] - 1).clamp_min(0), right=True)
    ranges = torch.stack([first, last], 1).reshape(-1)
    host = torch.cat([ptrs, numels, tags, chunk_end - (numels + block - 1) // block, ranges])
    interpret = device.type != "cuda"
    home, _ = _stream_of(device)
    # Review fix: a blocking copy (the host waits for the current stream once, on this cold path
    # only, as the CUDA binding does), so a first launch on ANY stream reads a filled table.
    table = host if interpret else host.to(device, non_blocking=False)
    arrive_first = (2**31 - (programs - 1)) % 2**32
    return _Table(
        table=table,
        num_tensors=len(grads),
        total_chunks=total_chunks,
        num_programs=programs,
        p_pow2=triton.next_power_of_2(programs),
        arrive_first=arrive_first - 2**32 if arrive_first >= 2**31 else arrive_first,
        interpret=interpret,
        home_stream=home,
    )


def _scratch(entry: _Table) -> _Scratch:
    """The current stream's partial slots and barrier counter for `entry`, made on first use.

    Made on the stream that uses them (NaN fill and zeroing are ordered before its launches there),
    so no synchronisation is needed and no other stream ever touches them. A stream other than the
    table's own is recorded on the table once, so freeing the entry waits for that stream's work.
    While a CUDA graph is captured, every call gets fresh scratch whose counter is zeroed inside the
    graph (one 4-byte memset node per replay), so no two graphs, nor a graph and eager calls, share
    a counter; the entry keeps it alive (captured entries are never evicted).
    """
    device = entry.table.device
    key, stream = _stream_of(device)
    _record(entry, key, stream)
    if stream is not None and torch.cuda.is_current_stream_capturing():
        made = _Scratch(
            partials=torch.empty((entry.num_programs,), dtype=torch.float64, device=device),
            sync=torch.zeros(1, dtype=torch.int32, device=device),
        )
        with _cache_lock:
            entry.graph_scratch.append(made)
        return made
    found = entry.scratch.get(key)
    if found is not None:
        return found
    with _cache_lock:
        found = entry.scratch.get(key)
        if found is None:
            found = entry.scratch[key] = _Scratch(
                partials=torch.full((entry.num_programs,), math.nan, dtype=torch.float64, device=device),
                sync=torch.zeros(1, dtype=torch.int32, device=device),
            )
    return found


def _record(entry: _Table, key: int, stream) -> None:
    """Record `stream` on the shared table once, unless it is the table's own (or a CPU tensor)."""
    if stream is None or key == entry.home_stream or key in entry.recorded:
        return
    with _cache_lock:
        if key not in entry.recorded:
            entry.table.record_stream(stream)
            entry.recorded.add(key)


def _check_counter(scratch: _Scratch) -> None:
    """DEBUG only (a host sync): the barrier's invariant, the counter's low 31 bits are 0."""
    value = int(scratch.sync.item())
    if value & 0x7FFFFFFF:
        raise RuntimeError(
            f"gradclip triton backend: grid-barrier counter is {value:#010x}, its low 31 bits are not 0 "
            "(a launch on this entry was interrupted, or two launches overlapped on one stream's counter); "
            "every later fused launch on it would deadlock or race. Fix: "
            "gradclip.triton_backend.configure() drops the cached tables; then find the overlapping launch"
        )


def _is_dense(g: Tensor) -> bool:
    """True when g's elements are exactly the `numel` consecutive elements from data_ptr."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(g.stride(), g.shape, strict=True) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _table_key(grads: list[Tensor]) -> tuple[bool, int, tuple]:
    """(every gradient dense, total numel, cache key of (data_ptr, numel, dtype) per tensor).

    One C++ pass in gradclip._C when it is built (~8 ns a tensor against ~600 ns here in Python).
    """
    native = _extension.load()[0]
    if native is not None:
        dense, total_numel, packed = native.tensor_table_key(grads)
        return dense, total_numel, (grads[0].device, packed)
    dense = all(map(Tensor.is_contiguous, grads)) or all(_is_dense(g) for g in grads)
    numels = tuple(map(Tensor.numel, grads))
    key = (grads[0].device, tuple(map(Tensor.data_ptr, grads)), numels, tuple(g.dtype for g in grads))
    return dense, sum(numels), key


def _table(grads: list[Tensor]) -> _Table | None:
    """The cached table of `grads`, or None when the kernels cannot serve them (reference then).

    Per call: one key of (data_ptr, numel, dtype) per tensor and a density check (`_table_key`); a dict hit.
    """
    if not grads:
        return None
    dense, total_numel, key = _table_key(grads)
    if not dense:
        return None
    device = grads[0].device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)  # LRU, not FIFO: a hot entry must not be evicted (review fix)
    if entry is None:
        if device.type not in ("cuda", "cpu") or total_numel == 0:
            return None
        if any(g.device != device or g.dtype not in _DTYPE_TAG for g in grads):
            return None
        if capturing:
            # Review fix: a miss during CUDA-graph capture would pin host memory (cudaHostAlloc, an
            # event query: not permitted while capturing) and copy host-to-device inside the graph.
            # Run the (capturable) reference instead; warm up once before capturing to get the kernel.
            return None
        entry = _build(grads, device)
        with _cache_lock:
            while len(_cache) >= CACHE_SIZE:
                victim = next((k for k, e in _cache.items() if not e.captured), None)
                if victim is None:
                    break
                del _cache[victim]
            entry = _cache.setdefault(key, entry)  # another thread may have built it meanwhile
    if capturing and not entry.captured:
        entry.captured = True  # a graph holds its addresses now: never free it
    return entry


# --- launches --------------------------------------------------------------------------------------


def _norm_launch_args(
    entry: _Table, norm: Tensor, max_norm: float, norm_code: int, scale: bool
) -> tuple[tuple, dict]:
    """(args, meta) shared by both fused norm kernels, with this stream's own partial slots and
    barrier counter (see the module docstring); GRADCLIP_DEBUG checks the counter first."""
    scratch = _scratch(entry)
    if DEBUG and not (norm.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _check_counter(scratch)
    args = (
        entry.table,
        entry.num_tensors,
        entry.total_chunks,
        scratch.partials,
        norm,
        scratch.sync,
        float(max_norm),
        entry.arrive_first,
    )
    meta = dict(
        NORM=norm_code,
        SCALE=scale,
        REVERSE=REVERSE_RESCALE,
        BLOCK=_config["block"],
        P_POW2=entry.p_pow2,
        num_warps=NUM_WARPS,
    )
    return args, meta


def _launch_norm(
    entry: _Table, norm: Tensor, max_norm: float, norm_code: int, scale: bool, phase: int
) -> None:
    kernel = _kernel("clip_grad_norm", norm.device)
    args, meta = _norm_launch_args(entry, norm, max_norm, norm_code, scale)
    grid = (entry.num_programs,)
    if entry.interpret:
        if phase == 0:  # the interpreter cannot run the grid barrier: same code, two launches
            kernel[grid](*args, PHASE=1, **meta)
            kernel[grid](*args, PHASE=2, **meta)
        else:
            kernel[grid](*args, PHASE=phase, **meta)
        return
    with torch.cuda.device(norm.device):
        if phase == 0:
            # Review fix: cap registers so PROGRAMS_PER_SM programs always fit one SM (64K registers):
            # above 128/thread only one 256-thread program fits, and the cooperative launch of
            # 2 * SMs programs fails (CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE). Compiled for sm_90 the
            # variants use 80-120 (NORM=0, SCALE=False: 120), too close to rely on.
            kernel[grid](*args, PHASE=0, launch_cooperative_grid=True, maxnreg=_MAX_REGS, **meta)
        else:
            kernel[grid](*args, PHASE=phase, **meta)


def _check_norm_type(norm_type: float) -> int | None:
    return _NORM_CODE.get(float(norm_type))


def total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """Global p-norm of `grads` (one device), a 0-dim fp32 tensor: one launch on the GPU."""
    norm_code = _check_norm_type(norm_type)
    entry = _table(grads) if norm_code is not None else None
    if entry is None:
        return reference.total_norm(grads, norm_type)
    norm = torch.empty((), dtype=torch.float32, device=grads[0].device)
    _launch_norm(entry, norm, 0.0, norm_code, scale=False, phase=0)
    return norm


def clip_grad_norm_(grads: list[Tensor], max_norm: float, norm_type: float) -> Tensor:
    """Fused norm + in-place rescale (skipped when the coefficient clamps to 1): one launch on the GPU."""
    norm_code = _check_norm_type(norm_type)
    entry = _table(grads) if norm_code is not None else None
    if entry is None:
        return reference.clip_grad_norm_(grads, max_norm, norm_type)
    norm = torch.empty((), dtype=torch.float32, device=grads[0].device)
    _launch_norm(entry, norm, max_norm, norm_code, scale=True, phase=0)
    return norm


def clip_grads_with_norm_(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale by min(max_norm / (total_norm + 1e-6), 1) read on the device; no write when it is 1.

    An fp16/bf16 total_norm is converted to fp32 on the device first (one extra tiny op; exact).
    An fp64 one runs the reference: torch's coefficient in fp64, then its `_foreach_mul_` (review
    fix: converting it to fp32 first rounded the norm before the coefficient, where torch and the
    CUDA backend stay in fp64).
    """
    entry = _table(grads) if total_norm.dtype != torch.float64 else None
    if entry is None:
        reference.clip_grads_with_norm_(grads, max_norm, total_norm)
        return
    norm = total_norm.to(device=grads[0].device, dtype=torch.float32)
    _launch_norm(entry, norm, max_norm, 2, scale=True, phase=3)


def clip_grad_value_(grads: list[Tensor], clip_value: float) -> None:
    """Clamp every gradient to [-clip_value, clip_value] in place: one launch; NaN stays NaN.

    Bit-for-bit torch's `_foreach_clamp_min_(-v)` then `_foreach_clamp_max_(v)` on the same device:
    on CUDA a tie returns the bound (so v = 0 turns every non-NaN element into +0.0, as CUDA torch);
    CPU tensors (the interpreter) keep CPU torch's element on a tie (-0.0 stays -0.0).
    """
    entry = _table(grads)
    if entry is None:
        reference.clip_grad_value_(grads, clip_value)
        return
    _launch_value(entry, grads[0].device, clip_value, ties_to_bound=grads[0].device.type == "cuda")


def _launch_value(entry: _Table, device: torch.device, clip_value: float, ties_to_bound: bool) -> None:
    kernel = _kernel("clip_grad_value", device)
    grid = (entry.num_programs,)
    args = (entry.table, entry.num_tensors, entry.total_chunks, float(clip_value))
    meta = dict(BLOCK=_config["block"], TIES_TO_BOUND=ties_to_bound, num_warps=NUM_WARPS)
    if entry.interpret:
        kernel[grid](*args, **meta)
        return
    key, stream = _stream_of(device)
    _record(entry, key, stream)
    with torch.cuda.device(device):
        kernel[grid](*args, **meta)


# --- per-parameter norms (issue 14) ----------------------------------------------------------------


def _launch_per_param(
    entry: _Table, norm: Tensor, per_param: Tensor, max_norm: float, norm_code: int, scale: bool
) -> None:
    """The fused kernel with per-tensor norms: one launch on the GPU (PHASE 0), two interpreted.

    Per-tensor partial slots (fp64, T + P - 1) are allocated per call, like the outputs; every
    slot the finish reads was written by this launch (poisoned with NaN under POISON_SCRATCH).
    """
    _kernel("clip_grad_norm", norm.device)  # the interpreter/device checks, and the module import
    kernel = importlib.import_module("gradclip.triton_kernels.clip_grad_norm").clip_grad_norm_per_param_kernel
    size = entry.num_tensors + entry.num_programs - 1
    if POISON_SCRATCH:
        tparts = torch.full((size,), math.nan, dtype=torch.float64, device=norm.device)
    else:
        tparts = torch.empty(size, dtype=torch.float64, device=norm.device)
    args, meta = _norm_launch_args(entry, norm, max_norm, norm_code, scale)
    args += (tparts, per_param)
    grid = (entry.num_programs,)
    if entry.interpret:  # no grid barrier in the interpreter: the same code as two launches
        kernel[grid](*args, PHASE=1, **meta)
        kernel[grid](*args, PHASE=2, **meta)
        return
    with torch.cuda.device(norm.device):
        kernel[grid](*args, PHASE=0, launch_cooperative_grid=True, maxnreg=_MAX_REGS, **meta)


# Tests set this to fill the per-tensor partial slots with NaN, so a slot read unwritten shows.
POISON_SCRATCH = False


def _per_param(grads: list[Tensor], max_norm: float, norm_type: float, scale: bool) -> tuple[Tensor, Tensor]:
    norm_code = _check_norm_type(norm_type)
    entry = _table(grads) if norm_code is not None else None
    if entry is None:
        if scale:
            return reference.clip_grad_norm_per_param_(grads, max_norm, norm_type)
        return reference.per_param_norms(grads, norm_type)
    norm = torch.empty((), dtype=torch.float32, device=grads[0].device)
    per_param = torch.empty(len(grads), dtype=torch.float32, device=grads[0].device)
    _launch_per_param(entry, norm, per_param, max_norm, norm_code, scale)
    return norm, per_param


def per_param_norms(grads: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    """(total, per_param): the total bitwise as `total_norm`, and each gradient's norm (fp32, input
    order) from the same pass: one launch on the GPU, no host sync, no float atomics."""
    return _per_param(grads, 0.0, norm_type, scale=False)


def clip_grad_norm_per_param_(
    grads: list[Tensor], max_norm: float, norm_type: float
) -> tuple[Tensor, Tensor]:
    """`clip_grad_norm_` (same norm, same rescale) that also returns each gradient's norm before
    clipping: one launch on the GPU."""
    return _per_param(grads, max_norm, norm_type, scale=True)


# --- registration ----------------------------------------------------------------------------------

_lib = torch.library.Library("gradclip", "IMPL")  # noqa: TOR901 (kept alive for the process)
for _name, _fn in {
    "total_norm": total_norm,
    "clip_grad_norm_": clip_grad_norm_,
    "clip_grads_with_norm_": clip_grads_with_norm_,
    "clip_grad_value_": clip_grad_value_,
    "per_param_norms": per_param_norms,
    "clip_grad_norm_per_param_": clip_grad_norm_per_param_,
}.items():
    for _key in ("CUDA", "CPU"):
        _lib.impl(f"triton_{_name}", _fn, _key)
