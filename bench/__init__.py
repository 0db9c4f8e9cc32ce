"""gradclip's benchmark harness (installed as `gradclip.bench`; `python -m gradclip bench`).

One runnable script per operation (`clip_grad_norm.py`) and small helpers: `workloads.py` (the
anchor parameter-shape sets, user models on the meta device), `providers.py` (torch, gradclip
backends, apex), `timing.py` (CUDA-graph/event, wall and profiler timers, copy bandwidth),
`report.py` (table and chart). `gpu_check.sh` is the one-command check for a lent GPU.
"""

from __future__ import annotations

from .clip_grad_norm import main, run

__all__ = ["main", "run"]
