"""``leaderboard.csv``: one line per cell."""

from __future__ import annotations

import csv
import io

from peftbench.leaderboard.grouping import Group
from peftbench.leaderboard.significance import difference, interval
from peftbench.leaderboard.table import _csv_number, _fmt_number


def csv_text(groups: list[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["backbone", "hardware", "precision", "random_init", "method", "settings", "task", "split",
                     "mean", "std", "n", "failed", "trainable", "peak_memory_mb", "train_samples_per_s",
                     "latency_ms_p50", "latency_ms_p95", "infer_samples_per_s", "merged_latency_ms_p50",
                     "merged_infer_samples_per_s", "backbone_name", "backbone_fingerprint", "ci95_low", "ci95_high",
                     "reference", "diff", "diff_ci95_low", "diff_ci95_high", "diff_p"])
    for group in groups:
        for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)):
            for task in group.tasks:
                cell = row.cells.get(task)
                if cell is None:
                    continue
                writer.writerow([group.backbone, group.hardware, group.precision, group.random_init, row.method,
                                 row.settings, task, group.split[task],
                                 "" if cell.mean is None else f"{cell.mean:.6f}", f"{cell.std:.6f}", len(cell.scores),
                                 len(cell.failures), _fmt_number(row.mean_of("params", "trainable")),
                                 _fmt_number(row.mean_of("metrics", "peak_memory_mb")),
                                 _fmt_number(row.mean_of("metrics", "train_samples_per_s")),
                                 *(_csv_number(row.mean_of(f"inference.{state}", key))
                                   for state, key in (("as_trained", "latency_ms_p50"),
                                                      ("as_trained", "latency_ms_p95"),
                                                      ("as_trained", "samples_per_s"), ("merged", "latency_ms_p50"),
                                                      ("merged", "samples_per_s"))),
                                 group.display_name, group.fingerprint or "",
                                 *(_csv_number(x) for x in (interval(group, row, task) or (None, None))),
                                 *_against(group, row, task)])
    return out.getvalue()


def _against(group: Group, row, task: str) -> list[str]:
    """The reference row's label, and the difference to it with its 95 % interval and p-value (blank: none)."""
    reference = group.references.get(row.label)
    found = difference(group, row, reference, task) if reference else None
    if found is None:
        return [reference.label if reference else "", "", "", "", ""]
    return [reference.label, *(_csv_number(found[k]) for k in ("diff", "low", "high", "p"))]
