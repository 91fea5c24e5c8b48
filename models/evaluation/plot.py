"""The quality report as a picture: per task, the nine metrics of every method side by side."""

from __future__ import annotations

from pathlib import Path

from models.evaluation.metrics import QUALITY_METRICS

# Ours first and in strong colours; baselines grey; other methods (--compare) in their own muted colours.
_OURS = {"model": "#c0392b", "fused": "#c0392b"}
_BASELINE_GREYS = ["#bdbdbd", "#9e9e9e", "#7d7d7d", "#5c5c5c"]
_OTHERS = ["#2e86c1", "#28b463", "#af7ac5", "#f5b041", "#48c9b0", "#5d6d7e", "#dc7633", "#1abc9c"]


def method_colours(methods: list[str], baselines: tuple[str, ...]) -> dict[str, str]:
    """A colour per method: ours red, baselines in greys, compared methods in distinct colours (stable order)."""
    out, grey, other = {}, iter(_BASELINE_GREYS * 4), iter(_OTHERS * 4)
    for m in methods:
        out[m] = _OURS.get(m) or (next(grey) if m in baselines else next(other))
    return out


def metrics_plot(summary: dict, path: Path, baselines: tuple[str, ...], title: str = "") -> Path:
    """PNG: one row per task, one panel per metric (higher is better), one bar per method with its mean and the
    best bar outlined; the method's rank among all of them is easy to read at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    tasks = sorted({t for per in summary.values() for t in per})
    colours = method_colours(methods, baselines)
    fig, axes = plt.subplots(len(tasks), len(QUALITY_METRICS), figsize=(2.0 * len(QUALITY_METRICS),
                                                                          2.1 * len(tasks) + 0.9), squeeze=False)
    for r, task in enumerate(tasks):
        present = [m for m in methods if task in summary[m]]
        for c, metric in enumerate(QUALITY_METRICS):
            ax = axes[r][c]
            values = [summary[m][task][metric] for m in present]
            bars = ax.bar(range(len(present)), values, color=[colours[m] for m in present])
            best = max(range(len(values)), key=values.__getitem__)
            bars[best].set_edgecolor("black")
            bars[best].set_linewidth(1.5)
            lo, hi = min(values), max(values)
            pad = (hi - lo) * 0.25 or abs(hi) * 0.05 or 1.0
            ax.set_ylim(lo - pad if lo > 0 and lo - pad > 0 else min(0, lo - pad), hi + pad)
            ax.set_xticks([])
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(metric, fontsize=10)
            if c == 0:
                n = summary[present[0]][task]["n"]
                ax.set_ylabel(f"{task}\n({n} pairs)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=min(len(methods), 8), fontsize=9, frameon=False)
    fig.suptitle(title or "Fusion quality per task (higher is better; best bar outlined)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
