"""Plots per group: score against trainable parameters and peak memory with Pareto fronts, learning-rate
sensitivity, throughput (PNG and SVG, byte-identical for the same records)."""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path

from peftbench.leaderboard.grouping import Group
from peftbench.leaderboard.table import visible


def tex(text: str) -> str:
    """Record text made safe for matplotlib, which reads ``$...$`` as mathematics."""
    return visible(str(text)).replace("$", r"\$")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher score (cost ascending)."""
    front, best = [], -math.inf
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((cost, score))
            best = score
    return front


def plot(group: Group, out_dir: Path) -> dict[str, bytes]:
    """Accuracy vs trainable params (log x) and vs peak memory per task, with Pareto fronts; throughput per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "peftbench"
    rows = sorted(group.rows.values(), key=lambda r: (r.method, r.label))
    pngs = {}

    def save(fig, name):
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, metadata=meta, dpi=90)
            (out_dir / f"{name}.{ext}").write_bytes(buf.getvalue())
            if ext == "png":
                pngs[name] = buf.getvalue()
        plt.close(fig)

    for x_key, section, xlabel, log in (("trainable", "params", "trainable parameters", True),
                                        ("peak_memory_mb", "metrics", "peak memory (MB)", False)):
        fig, axes = plt.subplots(1, len(group.tasks), figsize=(4 * len(group.tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], group.tasks):
            points = []
            for row in rows:
                cell = row.cells.get(task)
                x = statistics.fmean([r[section][x_key] for r in row.records if r["status"] == "success"
                                      and group.task_of(r) == task] or [math.nan])
                if cell and cell.scores and not math.isnan(x):
                    ax.errorbar(x, 100 * cell.mean, yerr=100 * cell.std, fmt="o", capsize=3, label=tex(row.label))
                    points.append((x, 100 * cell.mean))
            front = pareto(points)
            if front:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", ls="--", lw=1,
                        label="Pareto front")
            ax.set_xscale("log" if log else "linear")
            ax.set_title(tex(group.column(task)))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("entity F1 (%)" if group.metric[task] == "entity_f1" else "accuracy (%)")
        legend_below(fig, axes)
        save(fig, f"{group.slug}-accuracy-vs-{'params' if log else 'memory'}")

    if group.search:
        save(sensitivity_figure(group, plt), f"{group.slug}-lr-sensitivity")

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.6))
    speeds = [row.mean_of("metrics", "train_samples_per_s") or 0 for row in rows]
    ax.bar(range(len(rows)), speeds)
    ax.set_xticks(range(len(rows)), [tex(row.label) for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("train samples/s (mean over tasks)")
    fig.tight_layout()
    save(fig, f"{group.slug}-throughput")
    return pngs


def sensitivity_figure(group: Group, plt):
    """Per task: mean dev score of each search trial against its learning rate, one line per study (a method
    with its settings), the chosen learning rate starred."""
    label = {r["provenance"]["study"]: row.label for row in group.rows.values() for r in row.records
             if r.get("provenance", {}).get("study")}
    chosen = {(r["provenance"]["study"], group.task_of(r)): r["config"]["train"]["lr"]
              for row in group.rows.values() for r in row.records if r.get("provenance", {}).get("phase") == "final"}
    tasks = sorted({group.task_of(r) for r in group.search})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trials: dict[str, dict[float, list[float]]] = {}
        for r in group.search:
            if group.task_of(r) == task and r["status"] == "success":
                study = r["provenance"]["study"]
                trials.setdefault(study, {}).setdefault(r["config"]["train"]["lr"], []).append(r["metrics"]["score"])
        for study in sorted(trials, key=lambda s: label.get(s, s)):
            lrs = sorted(trials[study])
            means = [100 * statistics.fmean(trials[study][lr]) for lr in lrs]
            line, = ax.plot(lrs, means, "o-", label=tex(label.get(study, study)))
            if (study, task) in chosen and chosen[study, task] in trials[study]:
                lr = chosen[study, task]
                ax.plot([lr], [100 * statistics.fmean(trials[study][lr])], "*", ms=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(tex(f"{task} (dev; ★ chosen)"))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("dev score (%)")
    legend_below(fig, axes)
    return fig


def legend_below(fig, axes) -> None:
    """The first panel's legend under all panels, in as many columns as its longest label leaves room for;
    the figure grows by the legend's rows, so the panels keep their size."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    chars = fig.get_figwidth() * 72 / 4.5  # characters of 7-point text across the figure
    ncol = max(1, min(4, len(labels), int(chars // (max(map(len, labels), default=1) + 8))))
    rows = math.ceil(len(labels) / ncol)
    legend_height = 0.2 + 0.15 * rows  # inches
    fig.set_figheight(fig.get_figheight() + legend_height)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
