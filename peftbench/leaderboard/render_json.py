"""``leaderboard.json``: every cell with what it pools, so another site or notebook can rebuild the tables without
peftbench (schema in docs/leaderboards.md)."""

from __future__ import annotations

import json

from peftbench.leaderboard.grouping import Group, task_identity
from peftbench.leaderboard.significance import difference, interval, pscp, significance

SCHEMA = 1
ROW_COSTS = (("params", "trainable"), ("params", "trainable_pct"), ("params", "adapter_bytes"),
             ("metrics", "peak_memory_mb"), ("metrics", "train_samples_per_s"), ("metrics", "train_tokens_per_s"))


def json_text(groups: list[Group], records: list[dict], sources: list[dict]) -> str:
    tables = []
    for group in groups:
        marks = significance(group)
        cells = []
        for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)):
            for task in group.tasks:
                runs = sorted((r for r in row.records if group.task_of(r) == task and not r.get("interrupted")),
                              key=lambda r: (r["config"]["train"]["seed"], r["run_id"]))
                if not runs:
                    continue
                cell, done = row.cells[task], [r for r in runs if r["status"] == "success"]
                key = "test_score" if group.split[task] == "test" else "score"
                cells.append({"row": row.label, "method": row.method, "column": task,
                              "task": runs[0]["config"]["task"]["name"], "split": group.split[task],
                              "metric": group.metric[task], "mean": cell.mean, "std": cell.std, "n": len(done),
                              "failed": len(cell.failures), "seeds": [r["config"]["train"]["seed"] for r in done],
                              "scores": [r["metrics"][key] for r in done], "run_ids": [r["run_id"] for r in runs],
                              "mark": marks.get((row.label, task), ""), "ci95": interval(group, row, task),
                              "against": _against(group, row, task),
                              "chosen": _chosen(runs),
                              "task_identity": task_identity(runs[0]),
                              "data_fingerprints": (runs[0].get("data") or {}).get("fingerprints")})
        rows = [{"row": row.label, "method": row.method, "pscp": pscp(row, group.tasks),
                 **{key: row.mean_of(section, key) for section, key in ROW_COSTS},
                 **{f"{key}_{state}": row.mean_of(f"inference.{state}", key)
                    for state in ("as_trained", "merged") for key in ("latency_ms_p50", "samples_per_s")}}
                for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label))]
        tables.append({"backbone": group.backbone, "backbone_name": group.display_name, "title": group.title,
                       "budget": group.budget, "baselines": group.baselines, "rows": rows,
                       "backbone_fingerprint": group.fingerprint, "hardware": group.hardware,
                       "precision": group.precision, "random_init": group.random_init, "columns": group.tasks,
                       "footnotes": group.footnotes, "cells": cells})
    page = {"schema": SCHEMA, "records": len(records), "newest": max(str(r["finished_at"]) for r in records),
            "sources": sources, "tables": tables}
    return json.dumps(page, ensure_ascii=False, indent=1, sort_keys=True, allow_nan=False) + "\n"


def _chosen(runs: list[dict]) -> dict | list[dict] | None:
    """What the search chose for a tuned cell: the rate and each other searched key; a list where the cell pools
    runs of several searches (its table says so); None for a cell of runs at a given rate."""
    found = []
    for r in runs:
        if (r.get("provenance") or {}).get("phase") == "final":
            chosen = {"lr": r["config"]["train"]["lr"], **r["provenance"].get("chosen_settings", {})}
            if chosen not in found:
                found.append(chosen)
    return found[0] if len(found) == 1 else found or None


def _against(group: Group, row, task: str) -> dict | None:
    """The reference row and the difference to it (mean, 95 % interval, p-value, test), or None."""
    reference = group.references.get(row.label)
    found = difference(group, row, reference, task) if reference else None
    return None if found is None else {"row": reference.label, **found}
