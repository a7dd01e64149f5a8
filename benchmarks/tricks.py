"""What each training trick costs per training example, against the plain run measured in the same process.

    python benchmarks/tricks.py                                   # LoRA on the tiny backbone, 40 steps each
    python benchmarks/tricks.py --method full --model leaderboards/zh-mini/model --steps 100

Each row is ``peftbench run`` on the synthetic task with one trick (docs/tricks.md), ``--steps`` optimizer steps,
no checkpoint, after one untimed plain run that takes the process's one-time costs; throughput is the record's
(real tokens, warm-up steps left out, clocks synchronised). Prints a Markdown table: trick, train samples/s, time
per example relative to the plain row, peak memory, and the hardware and versions the numbers come from; a trick
the method refuses is a row saying why.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from peftbench import config
from peftbench.errors import PeftbenchError
from peftbench.records import environment
from peftbench.train import run

TRICKS = {"plain": [], "cosine": ["train.scheduler=cosine"], "layer decay 0.8": ["train.layer_decay=0.8"],
          "label smoothing 0.1": ["train.label_smoothing=0.1"], "R-Drop 1.0": ["train.rdrop_alpha=1.0"],
          "FGM": ["train.adversarial=fgm"], "PGD (3 steps)": ["train.adversarial=pgd"],
          "EMA 0.99": ["train.ema_decay=0.99"], "SWA last 2": ["train.swa_last=2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--model", default="tiny", help="model.name_or_path")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        def measure(name: str, overrides: list[str]) -> dict:
            cfg = config.load(None, ["task.name=synthetic", f"model.name_or_path={args.model}", "task.max_length=64",
                                     f"method.name={args.method}", f"train.max_steps={args.steps}",
                                     f"train.batch_size={args.batch_size}", "train.save_checkpoint=false",
                                     "train.measure_inference=false", "train.evaluate_test=false",
                                     f"output_dir={Path(tmp) / name.replace(' ', '-')}", *overrides])
            return run(cfg).record["metrics"]

        measure("warm-up", [])  # the first run in a process pays one-time costs (kernels, allocator): not a row
        for name, overrides in TRICKS.items():
            try:
                rows[name] = measure(name, overrides)
            except PeftbenchError as e:  # a trick the method refuses (prefix trains nothing inside a layer)
                rows[name] = str(e)
    plain = rows["plain"]["train_samples_per_s"]
    env = environment()
    print(f"{args.method} on {args.model}, {args.steps} steps of {args.batch_size}: {env['device_name']}, torch "
          f"{env['torch']}, transformers {env['transformers']}, peft {env['peft']}\n")
    print("| trick | train samples/s | time per example vs plain | peak MB |")
    print("|---|---|---|---|")
    for name, m in rows.items():
        if isinstance(m, str):
            print(f"| {name} | refused: {m} | — | — |")
            continue
        print(f"| {name} | {m['train_samples_per_s']:.1f} | ×{plain / m['train_samples_per_s']:.2f} | "
              f"{m['peak_memory_mb']:.0f} |")


if __name__ == "__main__":
    main()
