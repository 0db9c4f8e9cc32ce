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


def wall_us(call: Callable[[], object], device: torch.device, budget_s: float, batches: int = 5) -> Spread:
    """Steady-state host time per call, µs: `batches` batches of n back-to-back calls, each batch
    timed from the host with a device sync at both ends (the sync cost is spread over n calls).
    n is picked from a probe so that one batch takes about budget_s / batches."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    probe = max(time.perf_counter() - start, 1e-7)
    n = int(min(max(budget_s / batches / probe, 1), 2000))
    per_call = []
    for _ in range(batches):
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            call()
        sync(device)
        per_call.append((time.perf_counter() - start) / n * 1e6)
    return Spread.of(per_call)


def graph_us(call: Callable[[], object], device: torch.device, budget_s: float) -> Spread:
    """GPU time per call, µs: the call captured once in a CUDA graph, each replay timed with a pair
    of CUDA events (median, p20, p80 over the replays). Raises if the call cannot be captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up off the capture stream, as torch's graph docs require
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    graph.replay()
    torch.cuda.synchronize(device)
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_ev.record()
    graph.replay()
    end_ev.record()
    end_ev.synchronize()
    probe_s = max(start_ev.elapsed_time(end_ev) / 1e3, 1e-6)
    reps = int(min(max(budget_s / probe_s, 10), 1000))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize(device)
    times = [a.elapsed_time(b) * 1e3 for a, b in events]
    del graph
    return Spread.of(times)


def launches_per_call(call: Callable[[], object], device: torch.device, calls: int = 3) -> float | None:
    """Kernels launched per call, counted by torch.profiler (memcpy/memset not counted). CUDA only."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    call()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize(device)
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return len(kernels) / calls


def copy_bandwidth(device: torch.device, nbytes: int, budget_s: float = 0.5) -> float:
    """Bytes/s of a large device-to-device (or host memcpy) copy, counting bytes read + written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    call = lambda: dst.copy_(src)  # noqa: E731
    if device.type == "cuda":
        for _ in range(3):
            call()
        times = graph_us(call, device, budget_s).median
    else:
        times = wall_us(call, device, budget_s).median
    return 2 * src.numel() * src.element_size() / (times * 1e-6)
