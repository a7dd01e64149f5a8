"""One FSDP2 LoRA run in this process (a group of one: the sharded code path, nothing split), its memory against
the planner's:

    python benchmarks/fsdp_check.py --arch bert-base-chinese --precision bf16      # GPU (gpu.sh runs it)
    python benchmarks/fsdp_check.py --arch tiny --precision no --steps 4           # CPU

Prints a table (planned, measured, ratio) of the weights, gradients and optimizer state the process holds (from
its tensors) and of peak memory (the planner's total), and writes the rows as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny", help="tiny, or an architecture built with random weights")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args(argv)

    from peftbench import config, plan
    from peftbench.train import run

    name = args.arch if args.arch == "tiny" else f"random:{args.arch}"
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"model.name_or_path={name}", "method.name=lora", "task.name=synthetic",
                     f"task.max_length={args.seq_len}", f"train.max_steps={args.steps}",
                     f"train.batch_size={args.batch_size}", f"train.mixed_precision='{args.precision}'",
                     "train.sharding=fsdp2", "train.measure_inference=false", "train.save_checkpoint=false",
                     f"output_dir={Path(tmp) / 'run'}"]
        cfg = config.load(None, overrides)
        planned = plan.plan(cfg, ["lora"], "cpu" if args.precision == "no" else None,
                            processes=1, strategy="fsdp")["rows"][0]["memory"]
        record = run(config.load(None, overrides)).record
    held = {k: v[0] for k, v in record["params"]["held_bytes_per_process"].items()}
    rows = [("weights", planned["base_weights"] + planned["trained_weights"], held["weights"]),
            ("gradients", planned["gradients"], held["gradients"]),
            ("optimizer state", planned["optimizer_state"], held["optimizer"]),
            ("peak memory (plan: total)", planned["total"], record["metrics"]["peak_memory_mb"] * MIB)]
    print(f"FSDP2 LoRA, one process: {args.arch}, {args.precision}, batch {args.batch_size} x {args.seq_len}, "
          f"{record['env']['device_name']} ({record['metrics']['memory_kind']})")
    print("| part | planned MiB | measured MiB | measured / planned |\n|---|---|---|---|")
    for part, want, got in rows:
        print(f"| {part} | {want / MIB:.1f} | {got / MIB:.1f} | {got / want:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": [{"part": p, "planned": w, "measured": g} for p, w, g in rows],
                                              "engine": record["env"]["engine"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
