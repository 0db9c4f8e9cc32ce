"""Timers: CUDA-graph replay with events (GPU time), host wall time in steady state, kernel launches
per call, and the copy bandwidth that the floors are derived from. CPU runs use host timers only.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Spread:
    median: float
    p20: float
    p80: float
    samples: int

    @staticmethod
    def of(values: list[float]) -> Spread:
        values = sorted(values)
        if len(values) == 1:
            return Spread(values[0], values[0], values[0], 1)
        q = statistics.quantiles(values, n=5, method="inclusive")  # 20/40/60/80 % cut points
        return Spread(statistics.median(values), q[0], q[3], len(values))

    def as_dict(self) -> dict:
        return {"median": self.median, "p20": self.p20, "p80": self.p80, "samples": self.samples}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe(call: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return max(time.perf_counter() - start, 1e-7)


def wall_us(
    calls: list[Callable[[], object]],
    device: torch.device,
    budget_s: float,
    restore: Callable[[], None] | None = None,
    batches: int = 5,
) -> Spread:
    """Steady-state host time per call, µs: `batches` batches of n back-to-back calls (calls[0..n)),
    each timed from the host with a device sync at both ends (the sync cost is spread over n).
    `restore` runs before each batch, untimed. n is picked from a probe so that a batch takes about
    budget_s / batches, and is at most len(calls)."""
    if restore:
        restore()
    probe = _probe(calls[0], device)
    n = int(min(max(budget_s / batches / probe, 1), len(calls)))
    per_call = []
    for _ in range(batches):
        if restore:
            restore()
        sync(device)
        start = time.perf_counter()
        for call in calls[:n]:
            call()
        sync(device)
        per_call.append((time.perf_counter() - start) / n * 1e6)
    return Spread.of(per_call)


def graph_us(
    calls: list[Callable[[], object]],
    device: torch.device,
    budget_s: float,
    restore: Callable[[], None] | None = None,
    max_calls: int = 32,
) -> Spread:
    """GPU time per call, µs: n calls (calls[0..n)) captured in one CUDA graph; each replay is timed
    with a pair of CUDA events and divided by n (median, p20, p80 over the replays). `restore`
    runs before each replay, outside the events. Raises if the calls cannot be captured."""
    if restore:
        restore()
    probe = _probe(calls[0], device)
    n = int(min(max(1e-4 / probe, 1), len(calls), max_calls))  # ~100 µs of work per replay
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for call in calls[:n]:  # warm-up off the capture stream, as torch's graph docs require
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    if restore:
        restore()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls[:n]:
            call()
    reps = int(min(max(budget_s / max(probe * n, 1e-6), 10), 200))
    times = []
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps + 1):
        if restore:
            restore()
        start_ev.record()
        graph.replay()
        end_ev.record()
        end_ev.synchronize()
        times.append(start_ev.elapsed_time(end_ev) * 1e3 / n)
    del graph
    return Spread.of(times[1:])  # the first replay uploads the graph


def launches_per_call(
    calls: list[Callable[[], object]], device: torch.device, restore: Callable[[], None] | None = None
) -> float | None:
    """Kernels launched per call, counted by torch.profiler over up to 3 calls (memcpy/memset not
    counted; `restore` runs before, outside the profile). CUDA only."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    calls = calls[:3]
    if restore:
        restore()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for call in calls:
            call()
        torch.cuda.synchronize(device)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return len(kernels) / len(calls)


def copy_bandwidth(device: torch.device, nbytes: int, budget_s: float = 0.5) -> float:
    """Bytes/s of a large device-to-device (or host memcpy) copy, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    calls = [lambda: dst.copy_(src)] * 8
    if device.type == "cuda":
        times = graph_us(calls, device, budget_s).median
    else:
        times = wall_us(calls, device, budget_s).median
    return 2 * src.numel() * src.element_size() / (times * 1e-6)
