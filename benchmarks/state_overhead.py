"""What resumability costs: the same run without and with a training state every N steps (``train.save_state_every``):

    python benchmarks/state_overhead.py --arch bert-base-chinese --precision bf16 --every 50   # GPU (gpu.sh runs it)
    python benchmarks/state_overhead.py --arch tiny --steps 8 --every 2                        # CPU

For each method: the run's wall seconds without states and with them, the states written, the seconds each
took, and the overhead (extra seconds over the run without). A short untimed run first warms the process
up; the device is synchronised inside each run before its clocks are read. Writes the rows as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="tiny", help="tiny, or an architecture built with random weights")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="train.save_state_every of the runs with states")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args(argv)

    from peftbench import config
    from peftbench.records import environment
    from peftbench.train import run

    name = args.arch if args.arch == "tiny" else f"random:{args.arch}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def wall(method: str, steps: int, every: int, tag: str) -> float:
            overrides = [f"model.name_or_path={name}", f"method.name={method}", "task.name=synthetic",
                         f"task.max_length={args.seq_len}", f"train.max_steps={steps}",
                         f"train.batch_size={args.batch_size}", f"train.mixed_precision='{args.precision}'",
                         f"train.save_state_every={every}", "train.measure_inference=false",
                         "train.save_checkpoint=false", "train.evaluate_test=false",
                         f"output_dir={Path(tmp) / f'{method}-{tag}'}"]
            return run(config.load(None, overrides)).record["metrics"]["wall_s"]

        for method in args.methods.split(","):
            wall(method, 2, 0, "warm-up")
            without, with_states = wall(method, args.steps, 0, "without"), wall(method, args.steps, args.every, "with")
            states = (args.steps - 1) // args.every  # none at the last step: the run publishes instead
            rows.append({"method": method, "steps": args.steps, "every": args.every, "states": states,
                         "wall_s_without": without, "wall_s_with": with_states,
                         "s_per_state": (with_states - without) / max(states, 1),
                         "overhead": (with_states - without) / without})
    env = environment(1)
    where = f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}"
    print(f"{where}; {args.arch}, {args.precision}, {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len}, a state every {args.every}")
    print("| method | wall s without | wall s with | states | s per state | overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['wall_s_without']:.1f} | {r['wall_s_with']:.1f} | {r['states']} | "
              f"{r['s_per_state']:.2f} | {r['overhead']:+.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "environment": env}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
