"""``peftbench ensemble``: score several checkpoints of one task as one model (their probabilities averaged) and
write the result as a record that lists its members, so that the leaderboard shows the ensemble as its own row."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from peftbench.config import finite
from peftbench.errors import PeftbenchError
from peftbench.inference import Ensemble
from peftbench.leaderboard.grouping import row_label
from peftbench.records import RECORD_NAME, environment, make_record, read_record, write_atomic


def member_record(ckpt: Path) -> dict | None:
    """The record of the run that wrote ``ckpt`` (``record.json`` beside it), or None."""
    path = ckpt.parent / RECORD_NAME
    return read_record(path) if path.is_file() else None


@torch.inference_mode()
def evaluate(ckpts: list[str | Path], out_dir: str | Path, data_dir: str | None = None, batch_size: int = 128,
             device: str = "cpu") -> dict:
    """Score the ensemble of ``ckpts`` on dev and (where labeled) test and write ``out_dir/record.json``: the
    first member's config, the members (checkpoint, run id, method, seed, row label), the scores with their
    per-example results, and as costs the members' together (trainable parameters and adapter bytes summed,
    training time per example summed, peak memory the largest, the least ``train_cpu_share``). Returns the record."""
    start = time.perf_counter()
    ensemble = Ensemble(list(ckpts), device)
    records = [member_record(c) for c in ensemble.ckpts]
    metrics, per_example, baselines, n = {}, {}, {}, {}
    for split in ("dev", "test"):
        try:
            batches, logits = ensemble.split_logits(split, data_dir, batch_size, labeled_only=True)
        except PeftbenchError:
            if split == "dev":
                raise
            continue  # no test split
        if logits is None:
            continue
        scores, ids, preds = batches.scored(logits)
        scores["eval_samples_per_s"] = len(batches.ds) / ensemble.forward_seconds  # the forward passes alone
        prefix = "" if split == "dev" else "test_"
        metrics.update({f"{prefix}{k}": v for k, v in scores.items() if not (prefix and k == "score_name")})
        found = batches.kind.per_example(ids, preds, batches.ds)
        if found is not None:
            per_example[split] = found
        baselines[split] = batches.kind.baselines(batches.ds, batches.data.spec)
        n[f"n_{split}"] = len(batches.ds)
    metrics.update(_costs(records))
    metrics["wall_s"] = time.perf_counter() - start
    members = [{"checkpoint": str(c.resolve()), "run_id": meta["run_id"], "method": meta["method"],
                "seed": meta["config"]["train"]["seed"], "label": row_label(r) if r else meta["method"]}
               for c, (_, _, meta), r in zip(ensemble.ckpts, ensemble.members, records)]
    config = dict(ensemble.meta["config"], output_dir=str(out_dir))
    run_id = hashlib.sha256(json.dumps(sorted(m["run_id"] for m in members)).encode()).hexdigest()[:16]
    first = records[0] or {}
    params = _summed_params(records)
    here = environment()  # the members' hardware (the table the ensemble joins); where it was scored beside
    record = make_record("success", config, run_id, first.get("env") or here, metrics, params, extra={
        "ensemble": {"members": members, "scored_on": here}, "per_example": per_example, "baselines": baselines,
        "backbone": first.get("backbone"), "settings": first.get("settings"),
        "data": {**(first.get("data") or {}), **n}, "provenance": {"command": "peftbench ensemble " + " ".join(
            str(c) for c in ckpts)}})
    write_atomic(Path(out_dir) / RECORD_NAME, record)
    return record


def _summed_params(records: list[dict | None]) -> dict:
    """The members' trained parameters, parameters and adapter bytes summed (None where a member's is unknown)."""
    found = {key: [(r or {}).get("params", {}).get(key) for r in records]
             for key in ("trainable", "total", "adapter_bytes")}
    return {key: None if None in values else sum(values) for key, values in found.items()}


def _costs(records: list[dict | None]) -> dict:
    """The members' training costs as one: time per example summed, peak memory the largest (None: unknown), and
    on a CPU the least member ``train_cpu_share`` (the summed speed is as much its own as its least vouched part)."""
    metrics = [(r or {}).get("metrics", {}) for r in records]
    rates = [m.get("train_samples_per_s") for m in metrics]
    known = None not in rates and all(rates)
    costs = {"train_samples_per_s": 1 / sum(1 / r for r in rates) if known else float("nan"),
             "train_tokens_per_s": 1 / sum(1 / m["train_tokens_per_s"] for m in metrics) if known else float("nan"),
             "peak_memory_mb": None if None in (peaks := [m.get("peak_memory_mb") for m in metrics]) else max(peaks)}
    shares = [m.get("train_cpu_share") for m in metrics]
    if all(finite(s) for s in shares):
        costs["train_cpu_share"] = min(shares)
    return costs
