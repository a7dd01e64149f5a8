"""``model-index.yaml`` (``peftbench leaderboard --model-index``): every row of every table as a model-index entry
(the block a Hugging Face model card's front matter holds), each column's cell mean as its result."""

from __future__ import annotations

import yaml

from peftbench.leaderboard.grouping import Group


def model_index_text(groups: list[Group]) -> str:
    from peftbench.model_index import eval_results, model_index

    entries = []
    for group in groups:
        for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)):
            results = []
            for task in group.tasks:
                runs = [r for r in row.records if group.task_of(r) == task and r["status"] == "success"]
                if not runs or row.cells[task].mean is None:
                    continue
                name, metric = runs[0]["config"]["task"]["name"], group.metric[task]
                hub = (runs[0].get("data") or {}).get("hub")  # what the run read from the hub, if anything
                kind = "token_classification" if metric.startswith("entity_") else "classification"
                prefix = "test_" if group.split[task] == "test" else ""
                results += eval_results(name, hub, kind, {prefix + metric: row.cells[task].mean},
                                        dataset_name=task)  # the column: one task may fill several
            entries.append((f"{row.label} · {group.title}", results))
    return yaml.safe_dump({"model-index": model_index(entries)}, allow_unicode=True, sort_keys=False)
