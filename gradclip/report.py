"""Host-side views of a Clipper's history: the text report and the PNG plot.

Both read the device history in one transfer (History.snapshot) and compute everything else on
the host in plain Python; matplotlib is imported only by `plot`.

The suggested max_norm is the 90th percentile of the recorded norms of well-behaved steps
(finite and not spikes). Why that rule: the threshold should bound the rare outliers, not rescale
the typical step (clipping most steps amounts to a smaller learning rate, and an adaptive
optimiser then mostly sees the threshold instead of the gradient); with the 90th percentile,
about one well-behaved step in ten and every spike are clipped. Spikes and non-finite steps are
left out so that the very events clipping guards against do not raise the threshold. When the
remaining norms span more than three orders of magnitude the run is diverging (or spikes were not
judged yet), and no value is suggested.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradclip import history as history_mod

if TYPE_CHECKING:
    from gradclip.clipper import Clipper

SUGGEST_PERCENTILE = 90.0
SUGGEST_MIN_STEPS = 20
HEATMAP_ROWS = 40
SUGGEST_MAX_SPREAD = 3.0  # orders of magnitude between the smallest and largest good norm


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _require_history(clipper: Clipper) -> history_mod.History:
    if clipper.history is None:
        raise ValueError(
            "this Clipper keeps no history: build it with history=N (e.g. Clipper(..., history=1024)) "
            "to get a report or a plot"
        )
    return clipper.history


def suggest_max_norm(norms: list[float], flags: list[int]) -> float:
    """SUGGEST_PERCENTILE-th percentile of the finite non-spike norms (NaN with too few of them)."""
    good = [n for n, f in zip(norms, flags, strict=True) if f == 0 and math.isfinite(n)]
    return percentile(good, SUGGEST_PERCENTILE) if len(good) >= SUGGEST_MIN_STEPS else math.nan


def _top_params(names: tuple[str, ...], row: list[float], top: int) -> str:
    nonfinite = [(n, v) for n, v in zip(names, row, strict=True) if not math.isfinite(v)]
    if nonfinite:  # in parameter order: the first ones bracket where the NaN/inf came from
        shown = ", ".join(f"{n}={v}" for n, v in nonfinite[:top])
        more = f" (+{len(nonfinite) - top} more)" if len(nonfinite) > top else ""
        return f"non-finite in {len(nonfinite)} of {len(names)} parameters, first: {shown}{more}"
    largest = sorted(zip(names, row, strict=True), key=lambda nv: nv[1], reverse=True)[:top]
    return "largest: " + ", ".join(f"{n}={v:.4g}" for n, v in largest)


def text(clipper: Clipper, top: int = 10) -> str:
    """The report behind Clipper.report(): steps, norm statistics, clipping rate, spikes with the
    parameters behind each, and a suggested max_norm (rule in this module's docstring)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    history = _require_history(clipper)
    snap = history.snapshot()
    norms, coefs, flags = snap["norm"], snap["coef"], snap["flags"]
    n = len(norms)
    lines = [
        f"gradclip.Clipper report: {snap['steps']} steps seen, the last {n} recorded "
        f"(history={history.size}); max_norm={clipper.max_norm}, norm_type={clipper.norm_type}, "
        f"{len(clipper.names)} parameters"
    ]
    if n == 0:
        lines.append("no step recorded yet")
        return "\n".join(lines)
    finite = [x for x in norms if math.isfinite(x)]
    n_nonfinite = n - len(finite)
    if finite:
        mean = sum(finite) / len(finite)
        lines.append(
            f"grad norm (before clipping), {len(finite)} finite steps: mean {mean:.4g}, "
            f"median {percentile(finite, 50):.4g}, max {max(finite):.4g}, min {min(finite):.4g}"
        )
    lines.append(f"non-finite norm: {n_nonfinite} of {n} steps")
    clipped = sum(1 for c in coefs if c < 1.0)
    lines.append(f"clipping rate: {100.0 * clipped / n:.1f}% ({clipped} of {n} steps had clip_coef < 1)")
    n_spikes = sum(1 for f in flags if f & history_mod.FLAG_SPIKE)
    lines.append(
        f"spikes: {n_spikes} in the recorded steps (rule: norm > mean + {history.sigma:g} std of the "
        f"previous {history.window} finite norms, active once {history.min_steps} are recorded)"
    )
    events = snap["events"]
    if snap["events_seen"] > len(events):
        lines.append(f"  ({snap['events_seen']} spike/non-finite events seen, the last {len(events)} kept)")
    i = 0
    while i < len(events):
        e = events[i]
        kind = "non-finite" if e["flags"] & history_mod.FLAG_NONFINITE else "spike"
        line = f"  step {e['step']}: {kind}, norm {e['norm']:.4g}"
        if e["per_param"]:
            line += "; " + _top_params(clipper.names, e["per_param"], top)
        j = i  # a run of non-finite steps right after this one: one line
        while (
            kind == "non-finite"
            and j + 1 < len(events)
            and events[j + 1]["step"] == events[j]["step"] + 1
            and events[j + 1]["flags"] & history_mod.FLAG_NONFINITE
        ):
            j += 1
        if j > i:
            line += f"\n    ... and non-finite in every step through {events[j]['step']} ({j - i} more)"
        lines.append(line)
        i = j + 1
    if snap["per_param"]:
        means = []
        for j, name in enumerate(clipper.names):
            col = [row[j] for row, f in zip(snap["per_param"], flags, strict=True) if f == 0]
            col = [v for v in col if math.isfinite(v)]
            means.append((name, sum(col) / len(col) if col else math.nan))
        means = sorted((m for m in means if math.isfinite(m[1])), key=lambda nv: nv[1], reverse=True)
        lines.append(
            "largest mean norm in well-behaved steps: "
            + ", ".join(f"{name}={v:.4g}" for name, v in means[:top])
        )
    suggestion = suggest_max_norm(norms, flags)
    good_norms = [x for x, f in zip(norms, flags, strict=True) if f == 0 and math.isfinite(x)]
    good = len(good_norms)
    spread = math.log10(max(good_norms) / min(good_norms)) if good and min(good_norms) > 0 else 0.0
    if math.isnan(suggestion):
        lines.append(
            f"suggested max_norm: not enough well-behaved steps ({good} < {SUGGEST_MIN_STEPS}) to suggest one"
        )
    elif spread > SUGGEST_MAX_SPREAD:
        lines.append(
            f"suggested max_norm: none: the finite non-spike norms span {spread:.0f} orders of magnitude, so "
            "these steps are not well-behaved (the run diverges, or spike detection was not active yet); "
            "record a run that clips and ask again"
        )
    else:
        would_clip = sum(1 for x in norms if not (x <= suggestion))
        lines.append(
            f"suggested max_norm: {suggestion:.4g} = the {SUGGEST_PERCENTILE:g}th percentile of the {good} "
            "finite non-spike norms (bounds the outliers without rescaling the typical step; "
            f"it would have clipped {would_clip} of the {n} recorded steps)"
        )
    return "\n".join(lines)


def _heatmap_rows(names: tuple[str, ...], rows: list[list[float]], norm_type: float):
    """(labels, matrix[label][step], "parameter" or "module"): per module when there are too many."""
    unit = "parameter"
    columns = list(zip(*rows, strict=True)) if rows else []
    labels, series = list(names), [list(c) for c in columns]
    if len(labels) > HEATMAP_ROWS:  # combine the parameters of each module (drop the last name part)
        groups: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            groups.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(j)
        labels, series, unit = [], [], "module"
        for label, members in groups.items():
            combined = []
            for step in range(len(rows)):
                values = [abs(rows[step][j]) for j in members]
                if math.isinf(norm_type):
                    combined.append(max(values))
                else:
                    combined.append(sum(v**norm_type for v in values) ** (1.0 / norm_type))
            labels.append(label)
            series.append(combined)
    if len(labels) > HEATMAP_ROWS:  # still too many: keep the rows that peak highest
        peak = [max((v for v in s if math.isfinite(v)), default=-math.inf) for s in series]
        keep = sorted(sorted(range(len(labels)), key=lambda j: peak[j], reverse=True)[:HEATMAP_ROWS])
        labels, series = [labels[j] for j in keep], [series[j] for j in keep]
    return labels, series, unit


def plot(clipper: Clipper, path: str) -> str:
    """The PNG behind Clipper.plot(path): total norm per step with max_norm and the spikes, and a
    heatmap of per-parameter (or per-module) norms over the steps when they were recorded."""
    history = _require_history(clipper)
    try:
        import matplotlib  # noqa: PLC0415 (optional, imported on use)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ImportError(f"Clipper.plot needs matplotlib ({exc}); fix: pip install matplotlib") from exc
    snap = history.snapshot()
    steps, norms, flags = snap["step"], snap["norm"], snap["flags"]
    heat = bool(snap["per_param"])
    fig, axes = plt.subplots(
        2 if heat else 1,
        1,
        figsize=(10, 8 if heat else 4.5),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    ax = axes[0][0]
    finite = [(s, x) for s, x in zip(steps, norms, strict=True) if math.isfinite(x) and x > 0]
    if finite:
        ax.plot([s for s, _ in finite], [x for _, x in finite], lw=1, label="grad norm (before clipping)")
        ax.set_yscale("log")
    if math.isfinite(clipper.max_norm) and clipper.max_norm > 0:
        ax.axhline(clipper.max_norm, color="tab:green", ls="--", lw=1, label=f"max_norm {clipper.max_norm:g}")
    spikes = [(s, x) for s, x, f in zip(steps, norms, flags, strict=True) if f & history_mod.FLAG_SPIKE]
    if spikes:
        ax.scatter([s for s, _ in spikes], [x for _, x in spikes], color="tab:red", zorder=3, label="spike")
    bad = [s for s, f in zip(steps, flags, strict=True) if f & history_mod.FLAG_NONFINITE]
    for k, s in enumerate(bad):
        ax.axvline(s, color="tab:red", alpha=0.4, lw=1, label="non-finite norm" if k == 0 else None)
    ax.set(ylabel="gradient norm", title=f"gradclip.Clipper: {snap['steps']} steps, {len(steps)} recorded")
    ax.legend(loc="upper left", fontsize="small")
    if heat:
        hax = axes[1][0]
        labels, series, unit = _heatmap_rows(clipper.names, snap["per_param"], clipper.norm_type)
        matrix = [[math.log10(v) if math.isfinite(v) and v > 0 else math.nan for v in s] for s in series]
        lo, hi = (steps[0] - 0.5, steps[-1] + 0.5) if steps else (0, 1)
        image = hax.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(lo, hi, len(labels) - 0.5, -0.5),
        )
        hax.set_yticks(range(len(labels)))
        hax.set_yticklabels(labels, fontsize=max(4, min(8, 300 // max(1, len(labels)))))
        hax.set(xlabel="step", title=f"log10 gradient norm per {unit}")
        fig.colorbar(
            image, ax=[ax, hax], shrink=0.5, anchor=(0.0, 0.0), label="log10 norm (white: 0 or non-finite)"
        )
    else:
        ax.set_xlabel("step")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
