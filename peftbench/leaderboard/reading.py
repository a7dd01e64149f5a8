"""Reading record folders for a table: the usable records (a run found in several folders counts once), why
the others were skipped, and what each folder holds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.records import NOT_IDENTITY, RECORD_NAME, read_record


def finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_for_table(record: dict, source: str) -> dict:
    """The fields a table reads, with the types it needs (a record can be valid JSON and still unusable)."""
    config = record["config"]
    if not isinstance(config, dict) or not isinstance(record.get("finished_at"), str):
        raise PeftbenchError(f"{source}: fields 'config' (an object) and 'finished_at' (a time) are needed")
    for section, key in (("task", "name"), ("method", "name"), ("model", "name_or_path"), ("train", "lr"),
                         ("train", "seed"), ("train", "mixed_precision")):
        value = config.get(section, {}).get(key) if isinstance(config.get(section), dict) else None
        if value is None or (key == "lr" and not finite_number(value)):
            raise PeftbenchError(f"{source}: field 'config.{section}.{key}' missing or not usable ({value!r})")
    if not isinstance(record["env"], dict):
        raise PeftbenchError(f"{source}: field 'env' is not an object")
    if record["status"] == "success":
        metrics = record["metrics"]
        for key in ("score", *(["test_score"] if "test_score" in metrics else [])):
            if not finite_number(metrics.get(key)):
                raise PeftbenchError(f"{source}: field 'metrics.{key}' is {metrics.get(key)!r}, not a finite number")
    return record


def collect(dirs: list[str | Path], strict: bool = False) -> tuple[list[dict], list[str]]:
    """Every usable record under ``dirs``, and why each other one was skipped (``strict``: an error instead).
    A run found in several folders on one kind of hardware (workers of one sweep, a failed cell retried
    elsewhere) counts once: its successful record, else its newest."""
    paths = sorted(p for d in dirs for p in Path(d).rglob(RECORD_NAME)  # not the staging folder of a running run
                   if not any(part.startswith(".") for part in p.relative_to(d).parts))
    if not paths:
        raise PeftbenchError(f"no {RECORD_NAME} under {', '.join(map(str, dirs))}")
    records, skipped = [], []
    for path in paths:
        try:
            records.append(_check_for_table(read_record(path), str(path)))
        except PeftbenchError as exc:
            if strict:
                raise
            skipped.append(str(exc))
    if not records:
        raise PeftbenchError(f"no usable {RECORD_NAME} under {', '.join(map(str, dirs))} ({len(skipped)} skipped)")
    buckets: dict[str, list[dict]] = {}
    for r in records:
        buckets.setdefault(_run(r), []).append(r)
    kept: dict[int, dict] = {}
    for found in buckets.values():
        parts: dict[str, list[dict]] = {}
        for r in found:
            parts.setdefault(_made_of(r), []).append(r)
        bare = parts.pop("", [])  # failed before the backbone and data loaded: a duplicate of any part
        for part in parts.values() or [[]]:
            best = max(part + bare, key=lambda r: (r["status"] == "success", bool(_made_of(r)), r["finished_at"]))
            kept[id(best)] = best
    return [r for r in records if id(r) in kept], skipped


def sources(dirs: list[str | Path]) -> list[dict]:
    """Each folder given: its usable records, the hardware they ran on and their first and last finish time."""
    found = []
    for folder in dirs:
        try:
            records = collect([folder])[0]
        except PeftbenchError:
            records = []
        times = sorted(str(r["finished_at"]) for r in records) or ["", ""]
        found.append({"folder": str(folder), "records": len(records), "first": times[0], "last": times[-1],
                      "hardware": sorted({hardware(r["env"]) for r in records})})
    return found


def _run(record: dict) -> str:
    """A run's identity but what it was made of: its run id, its config but where it was written and the keys that
    change no result (``NOT_IDENTITY``: a retry with a longer timeout is the same run), its hardware."""
    config = {k: v for k, v in record["config"].items() if k != "output_dir"}
    if isinstance(config.get("train"), dict):
        config["train"] = {k: v for k, v in config["train"].items() if k not in NOT_IDENTITY}
    return record["run_id"] + hardware(record["env"]) + json.dumps(config, sort_keys=True, default=str)


def _made_of(record: dict) -> str:
    """The backbone and data a run read ("" where its record does not say)."""
    backbone, data = (record.get("backbone") or {}).get("fingerprint"), (record.get("data") or {}).get("fingerprints")
    return "" if backbone is None and data is None else json.dumps([backbone, data], sort_keys=True)


def hardware(env: dict) -> str:
    procs = env.get("num_processes", 1)
    return f"{env.get('device_name', 'unknown')} ×{procs}"
