"""``leaderboard.csv``: one line per cell."""

from __future__ import annotations

import csv
import io

from peftbench.leaderboard.grouping import Group
from peftbench.leaderboard.significance import interval
from peftbench.leaderboard.table import _csv_number, _fmt_number


def csv_text(groups: list[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["backbone", "hardware", "precision", "random_init", "method", "settings", "task", "split",
                     "mean", "std", "n", "failed", "trainable", "peak_memory_mb", "train_samples_per_s",
                     "latency_ms_p50", "latency_ms_p95", "infer_samples_per_s", "merged_latency_ms_p50",
                     "merged_infer_samples_per_s", "backbone_name", "backbone_fingerprint", "ci95_low", "ci95_high"])
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
                                 *(_csv_number(x) for x in (interval(group, row, task) or (None, None)))])
    return out.getvalue()
