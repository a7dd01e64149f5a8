"""The targets of docs/performance.md and docs/planning.md, read from one gpu.sh run's JSON files:

    python benchmarks/targets.py OUT_DIR

Prints one table: each target, what was measured, whether it is met (``—`` when the run lacks the row).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def find(table: list[dict], lengths: str, method: str, precision: str | None = None) -> dict | None:
    for row in table:
        if row["lengths"] == lengths and row["method"] == method and precision in (None, row["precision"]):
            return row
    return None


def ok(stats) -> bool:
    return bool(stats) and "error" not in stats


def targets(out: Path) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target; met None when the run has no numbers for it."""
    base, large = rows(out / "bert-base.json"), rows(out / "large.json")
    result = []
    lora, full = find(base, "fixed", "lora"), find(base, "fixed", "full")
    if lora and ok(lora["peftbench"]) and ok(lora["plain"]):
        ratio = lora["peftbench"]["samples_per_s"] / lora["plain"]["samples_per_s"]
        result.append(("LoRA ≥ 3× the plain loop (base arch, fixed length)", f"{ratio:.2f}×", ratio >= 3))
    else:
        result.append(("LoRA ≥ 3× the plain loop (base arch, fixed length)", "—", None))
    if lora and full and ok(lora["peftbench"]) and ok(full["peftbench"]):
        speed = full["peftbench"]["ms_per_step"] / lora["peftbench"]["ms_per_step"]
        memory = lora["peftbench"]["peak_memory_mb"] / full["peftbench"]["peak_memory_mb"]
        result.append(("LoRA step ≥ 1.3× faster than full", f"{speed:.2f}×", speed >= 1.3))
        result.append(("LoRA peak memory ≤ 0.5× full", f"{memory:.2f}×", memory <= 0.5))
    else:
        result += [("LoRA step ≥ 1.3× faster than full", "—", None), ("LoRA peak memory ≤ 0.5× full", "—", None)]
    big = find(large, "fixed", "full")
    mfu = big["peftbench"]["mfu"] if big and ok(big["peftbench"]) else None
    result.append(("full fine-tuning MFU ≥ 40 % (large arch)", "—" if mfu is None else f"{mfu:.1%}",
                   None if mfu is None else mfu >= 0.40))
    ratios = [row["peftbench"]["samples_per_s"] / row["trainer"]["samples_per_s"]
              for row in base + large if ok(row["peftbench"]) and ok(row.get("trainer"))]
    result.append(("peftbench ≥ 1.0× the Trainer at every setting",
                   f"min {min(ratios):.2f}× over {len(ratios)} rows" if ratios else "—",
                   min(ratios) >= 1.0 if ratios else None))
    plan = out / "plan.json"
    if plan.is_file():
        worst = json.loads(plan.read_text())["worst_error"]
        result.append(("planner within ±15 % of measured memory", f"worst {worst:.1%}", worst <= 0.15))
    else:
        result.append(("planner within ±15 % of measured memory", "—", None))
    fsdp = [r for r in rows(out / "fsdp.json") if not r["part"].startswith("peak")]
    if fsdp:
        worst = max(abs(r["measured"] / r["planned"] - 1) for r in fsdp)
        result.append(("FSDP2 LoRA holds what the plan says (±15 %)", f"worst {worst:.1%}", worst <= 0.15))
    else:
        result.append(("FSDP2 LoRA holds what the plan says (±15 %)", "—", None))
    state = rows(out / "state.json")
    if state:
        worst = max(r["overhead"] for r in state)
        result.append(("a training state every 100 steps costs ≤ 5 % of a run", f"worst {worst:+.1%}",
                       worst <= 0.05))
    else:
        result.append(("a training state every 100 steps costs ≤ 5 % of a run", "—", None))
    matrix = rows(out / "matrix.json")
    crashed = [r for r in matrix if r["status"].startswith("error")]
    result.append(("every method × precision × base runs (or is refused by design)",
                   f"{len(matrix) - len(crashed)}/{len(matrix)} cells" if matrix else "—",
                   (not crashed) if matrix else None))
    return result


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "runs/bench-gpu")
    print("| target | measured | met |\n|---|---|---|")
    for name, measured, met in targets(out):
        print(f"| {name} | {measured} | {'—' if met is None else 'yes' if met else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
