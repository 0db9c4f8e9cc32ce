"""Render a benchmark result (the JSON document of bench.clip_grad_norm.run): stdout table, PNG chart."""

from __future__ import annotations


def _f(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _spread(s: dict | None) -> str:
    if not s:
        return "–"
    return f"{s['median']:.1f} [{s['p20']:.1f}–{s['p80']:.1f}]"


def table(doc: dict) -> str:
    meta = doc["meta"]
    cuda = meta["device"].startswith("cuda")
    where = meta["gpu"] if cuda else f"CPU ({meta['cpu']}, {meta['cpu_threads']} threads) - NOT the headline"
    lines = [
        f"gradclip bench: {where}; torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
        f"python {meta['python']}; commit {meta['commit']}; {meta['date']}",
        f"copy bandwidth {meta['copy_bandwidth_GBps']:.1f} GB/s (read + write); "
        + ("GPU µs = CUDA-graph replay, median [p20–p80]" if cuda else "host timers only (no GPU time)"),
    ]
    for name, why in doc.get("skipped_providers", {}).items():
        lines.append(f"skipped {name}: {why}")
    header = (
        "| provider | GPU µs med [p20–p80] | wall µs | launches | GB/s | x torch GPU | x torch wall "
        "| / 1-pass | / 3-pass | compile s | note |"
    )
    for res in doc["results"]:
        lines += [
            "",
            f"### {res['workload']} {res['dtype']} clipping {res['regime']} ({res['bound']}): "
            f"{res['tensors']} tensors, {res['elements'] / 1e6:.2f}M elements, {res['grad_bytes'] / 1e6:.1f} MB; "
            f"floors 1-pass {res['floor_1pass_us']:.1f} µs, 3-pass {res['floor_3pass_us']:.1f} µs",
            header,
            "|" + "---|" * 11,
        ]
        for r in res["providers"]:
            if r["status"] != "ok":
                label = "REFUSED (failed correctness)" if r["status"] == "refused" else "ERROR"
                lines.append(f"| {r['provider']} | {label}: {r.get('reason', '')} |" + " |" * 9)
                continue
            notes = list(r.get("notes", []))
            lines.append(
                f"| {r['provider']} | {_spread(r.get('gpu_us'))} | {_f((r.get('wall_us') or {}).get('median'))} "
                f"| {_f(r.get('launches'), '{:g}')} | {_f(r.get('gbps'))} | {_f(r.get('speedup_vs_torch_gpu'), '{:.2f}')} "
                f"| {_f(r.get('speedup_vs_torch_wall'), '{:.2f}')} | {_f(r.get('vs_floor_1pass'), '{:.2f}')} "
                f"| {_f(r.get('vs_floor_3pass'), '{:.2f}')} | {_f(r.get('compile_s'))} | {'; '.join(notes)} |"
            )
    if not cuda:
        lines += ["", meta.get("note", "")]
    return "\n".join(lines)


def chart(doc: dict, path: str) -> str | None:
    """Bar chart of the speedup over torch foreach per workload (GPU time on CUDA, wall on CPU).

    Returns the path written, or None when matplotlib is missing or there is nothing to plot."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    cuda = doc["meta"]["device"].startswith("cuda")
    key = "speedup_vs_torch_gpu" if cuda else "speedup_vs_torch_wall"
    groups = [f"{r['workload']}\n{r['dtype']} {r['regime']}" for r in doc["results"]]
    names = []
    for res in doc["results"]:
        for r in res["providers"]:
            if r["provider"] != "torch foreach" and r["provider"] not in names:
                names.append(r["provider"])
    if not groups or not names:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, res in enumerate(doc["results"]):
            row = next((r for r in res["providers"] if r["provider"] == name and r["status"] == "ok"), None)
            if row and row.get(key):
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(row[key])
        ax.bar(xs, ys, width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    timer = "GPU time (CUDA graph)" if cuda else "wall time, CPU - not the headline"
    ax.set_ylabel(f"speedup over torch foreach ({timer})")
    where = doc["meta"]["gpu"] or "CPU"
    ax.set_title(f"clip_grad_norm_ on {where}, torch {doc['meta']['torch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
