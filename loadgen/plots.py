"""PNG figures of a run (matplotlib, Agg backend): latency CDF per class,
SLO attainment over time, queue depth over time; and the compare bar chart.

Every figure is drawn from records (and scraped samples) alone, like the summary.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .records import RequestRecord  # noqa: E402
from .scrape import MetricSample  # noqa: E402
from .summary import TASK_ORDER  # noqa: E402

COLORS = {"image": "tab:blue", "video": "tab:orange", "all": "black"}


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def _tasks(records: Sequence[RequestRecord]) -> list[str]:
    return [t for t in TASK_ORDER if any(r.task == t for r in records)]


def latency_cdf(records: Sequence[RequestRecord], path: str | Path) -> Path:
    """CDF of the server-reported latency of measured OK requests, per class."""
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [r for r in records if not r.warmup and r.ok]
    for task in _tasks(measured):
        xs = sorted(r.latency_ms / 1e3 for r in measured if r.task == task)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{task} (n={len(xs)})", color=COLORS.get(task))
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if measured:
        ax.legend()
    ax.set_title("Latency CDF")
    return _save(fig, path)


def attainment_series(records: Sequence[RequestRecord], task: str = "all",
                      num_bins: int = 20) -> tuple[list[float], list[float]]:
    """(bin centre s, attainment) of measured requests binned by send time;
    empty bins are left out."""
    rs = [r for r in records if not r.warmup and (task == "all" or r.task == task)]
    if not rs:
        return [], []
    lo = min(r.send_s for r in rs)
    width_s = max((max(r.send_s for r in rs) - lo) / num_bins, 1e-9)
    bins: dict[int, list[bool]] = {}
    for r in rs:
        bins.setdefault(min(int((r.send_s - lo) / width_s), num_bins - 1), []).append(r.slo_met)
    keys = sorted(bins)
    return ([lo + (k + 0.5) * width_s for k in keys],
            [sum(bins[k]) / len(bins[k]) for k in keys])


def attainment_over_time(records: Sequence[RequestRecord], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in ["all", *_tasks(records)]:
        xs, ys = attainment_series(records, task)
        ax.plot(xs, ys, marker="o", ms=3, label=task, color=COLORS.get(task))
    ax.set_xlabel("send time (s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SLO attainment over time (by send time)")
    return _save(fig, path)


def queue_depth(samples: Sequence[MetricSample], path: str | Path) -> Path:
    """Scraped gauges over time: queue depth (solid) and running (dashed) per task."""
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"genserve_queue_depth": "-", "genserve_running_requests": "--",
              "genserve_paused_requests": ":"}
    for name, style in styles.items():
        for task in TASK_ORDER:
            pts = sorted((s.t_s, s.value) for s in samples if s.name == name and s.task == task)
            if pts:
                label = f"{name.removeprefix('genserve_')} {task}"
                ax.plot(*zip(*pts), style, label=label, color=COLORS.get(task))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests")
    ax.grid(alpha=0.3)
    if samples:
        ax.legend(fontsize=8)
    ax.set_title("Server queue depth (Prometheus)")
    return _save(fig, path)


def compare_bars(rows: Mapping[str, Mapping[str, float | None]], path: str | Path,
                 title: str = "SLO attainment per policy: live vs simulated") -> Path:
    """Grouped bars: one group per policy, one bar per series (e.g. "live all",
    "sim all"); ``rows[policy][series]`` is an attainment in [0, 1] or None."""
    series = sorted({s for r in rows.values() for s in r}, key=_series_order)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) * max(len(series), 1) / 2), 4))
    width = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ys = [_num(r.get(name)) for r in rows.values()]
        hatch = "//" if name.startswith("sim") else None
        ax.bar(xs, ys, width, label=name, hatch=hatch, color=COLORS.get(name.split()[-1]),
               alpha=0.55 if hatch else 0.9, edgecolor="black", linewidth=0.5)
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.set_title(title)
    return _save(fig, path)


def _num(value: float | None) -> float:
    return 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _series_order(name: str) -> tuple[int, int]:
    source, _, task = name.partition(" ")
    return (0 if source == "live" else 1, ["all", "image", "video"].index(task) if task in
            ("all", "image", "video") else 3)


def run_plots(records: Sequence[RequestRecord], samples: Sequence[MetricSample],
              out_dir: str | Path) -> list[Path]:
    """Every figure of one run into ``out_dir``; the queue plot only with samples."""
    out = Path(out_dir)
    paths = [latency_cdf(records, out / "latency_cdf.png"),
             attainment_over_time(records, out / "attainment_over_time.png")]
    if samples:
        paths.append(queue_depth(samples, out / "queue_depth.png"))
    return paths
