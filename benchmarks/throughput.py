"""Training throughput: peftbench's loop beside the plain transformers + PEFT loop.

    python benchmarks/throughput.py --arch bert-base-chinese --precisions bf16 --lengths fixed,tnews

For every method
and precision, on a random-init model of a given architecture (weights do not
change speed), it trains the same batches through

- **peftbench**: ``train.run`` itself (length-grouped dynamic padding, frozen weights in
  the compute dtype, fused AdamW on GPU, pinned non-blocking batches, no host sync in
  the step, optional ``torch.compile``), and
- **plain**: what users run today: a transformers model + PEFT + ``torch.optim.AdamW``
  under autocast (fp32 weights), every batch padded to ``--seq-len``,

in one process, and prints samples/s, real-token/s, ms/step, peak memory and MFU
for both, with the ratios peftbench / plain. Clocks are read after a device
synchronise; the first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import tempfile
from pathlib import Path

import torch

from peftbench import config, models
from peftbench.measure import StepTimer, model_shape, peak_matmul_flops, peak_memory_mb, reset_peak_memory, train_flops
from peftbench.methods import RunContext, get_method
from peftbench.records import environment, write_atomic

PLAIN_PEFT = ("full", "lora", "adalora", "ia3", "prompt")  # methods the plain loop can run (PEFT's prefix tuning
# does not run on transformers >= 5.24; adapters and BitFit are not in PEFT)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FILLER = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就"
          "分对成会可主发年动同工也能下过子说产种面而方后多定行学")


def lengths_for(mode: str, n: int, seq_len: int, seed: int = 0, tnews_file: Path | None = None) -> list[int]:
    """Text lengths (characters): ``fixed`` fills ``seq_len`` tokens; ``tnews`` samples FewCLUE TNEWS titles'
    lengths (from ``tnews_file`` when given, else uniform 10-34, close to their median 22 and p95 32)."""
    rng = random.Random(seed)
    if mode == "fixed":
        return [seq_len - 2] * n
    if mode != "tnews":
        raise ValueError(f"--lengths must be fixed or tnews, got {mode!r}")
    if tnews_file is not None:
        lines = tnews_file.read_text(encoding="utf-8").split("\n")
        pool = [len(json.loads(line)["sentence"]) for line in lines if line]
    else:
        pool = list(range(10, 35))
    return [min(rng.choice(pool), seq_len - 2) for _ in range(n)]


def write_task(root: Path, lengths: list[int], seed: int = 0) -> Path:
    """A 4-class FewCLUE-layout task with texts of the given lengths (content does not change speed)."""
    rng = random.Random(seed)

    def records(ls):
        rows = [{"sentence": "".join(rng.choice(FILLER) for _ in range(k)), "label": rng.randrange(4)} for k in ls]
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)

    root.mkdir(parents=True, exist_ok=True)
    (root / "train_few_all.json").write_text(records(lengths), encoding="utf-8")
    (root / "dev_few_all.json").write_text(records(lengths[:64]), encoding="utf-8")
    return root


def method_overrides(method: str) -> list[str]:
    return {"lora": ["method.r=8", "method.target_modules=[query, value]"]}.get(method, [])


def peftbench_step(arch: str, method: str, precision: str, data_dir: Path, args, out_dir: Path) -> dict:
    from peftbench.train import run

    cfg = config.load(None, [
        "task.name=custom", f"task.data_dir={data_dir}", "task.text_fields=[sentence]", "task.labels=['0','1','2','3']",
        f"task.max_length={args.seq_len}", f"model.name_or_path=random:{arch}", f"method.name={method}",
        *method_overrides(method), f"train.batch_size={args.batch_size}", f"train.max_steps={args.warmup + args.steps}",
        "train.epochs=1", f"train.timing_warmup_steps={args.warmup}", f"train.mixed_precision='{precision}'",
        "train.log_every=1000000", "train.save_checkpoint=false", f"train.compile={str(args.compile).lower()}",
        "train.lr=1e-4", f"output_dir={out_dir}"])
    result = run(cfg)
    m, p = result.record["metrics"], result.record["params"]
    model = result.model
    stats = {"samples_per_s": m["train_samples_per_s"], "tokens_per_s": m["train_tokens_per_s"],
             "ms_per_step": 1000 * m["timed_seconds"] / m["timed_steps"], "peak_memory_mb": m["peak_memory_mb"],
             "trainable": p["trainable"], **model_shape(model, get_method(method).virtual_token_modules)}
    del result, model
    return stats


def plain_step(arch: str, method: str, precision: str, data_dir: Path, args) -> dict:
    """The plain loop: transformers + PEFT + AdamW under autocast, batches padded to ``seq_len``, in file order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = (data_dir / "train_few_all.json").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["sentence"] for line in lines]
    tokenizer = models.char_tokenizer(texts)  # the vocabulary the peftbench path builds
    torch.manual_seed(0)
    model = models.load_model(config.ModelConfig(name_or_path=f"random:{arch}"), ["0", "1", "2", "3"], tokenizer)[0]
    if method != "full":
        from peft import get_peft_model

        m = get_method(method)(config.load(None, [f"method.name={method}", *method_overrides(method)]).method)
        model = get_peft_model(model, m.peft_config(RunContext(total_steps=args.warmup + args.steps, num_labels=4)))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dtype = DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    timer = StepTimer(device, warmup_steps=args.warmup)
    reset_peak_memory(device)
    for step in range(1, args.warmup + args.steps + 1):
        chunk = texts[(step - 1) * args.batch_size : step * args.batch_size]
        batch = tokenizer(chunk, padding="max_length", truncation=True, max_length=args.seq_len, return_tensors="pt")
        timer.count(len(chunk), int(batch["attention_mask"].sum()))
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = torch.randint(0, 4, (len(chunk),), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        timer.optimizer_step(step)
    timing, memory = timer.result(), peak_memory_mb(device)
    stats = {"samples_per_s": timing["timed_samples"] / timing["timed_seconds"],
             "tokens_per_s": timing["timed_tokens"] / timing["timed_seconds"],
             "ms_per_step": 1000 * timing["timed_seconds"] / timing["timed_steps"],
             "peak_memory_mb": memory["peak_memory_mb"],
             **model_shape(model, get_method(method).virtual_token_modules)}
    del model, optimizer
    return stats


def bench(args) -> list[dict]:
    rows = []
    peaks = {p: peak_matmul_flops(DTYPES.get(p, torch.float32)) for p in args.precisions}
    n = (args.warmup + args.steps) * args.batch_size
    for mode in args.lengths:
        lengths = [k + 2 for k in lengths_for(mode, n, args.seq_len, tnews_file=args.tnews_file)]  # + [CLS] [SEP]
        per_step = len(lengths) / (args.warmup + args.steps)
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = write_task(Path(tmp) / "data", [k - 2 for k in lengths])
            for method in args.methods:
                for precision in args.precisions:
                    row = {"arch": args.arch, "lengths": mode, "method": method, "precision": precision}
                    for name in ("peftbench", "plain"):
                        if name == "plain" and method not in PLAIN_PEFT:
                            row[name] = None
                            continue
                        try:
                            stats = (peftbench_step(args.arch, method, precision, data_dir, args, Path(tmp) / "run")
                                     if name == "peftbench"
                                     else plain_step(args.arch, method, precision, data_dir, args))
                        except Exception as exc:  # noqa: BLE001  (a failed cell is a result, e.g. out of memory)
                            first = str(exc).splitlines()[0] if str(exc) else ""
                            row[name] = {"error": f"{type(exc).__name__}: {first}"}
                            continue
                        finally:
                            gc.collect()
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                        flops_per_sample = train_flops(stats, lengths) / len(lengths)
                        stats["mfu"] = stats["samples_per_s"] * flops_per_sample / peaks[precision]
                        row[name] = stats
                    row["samples_per_step"] = per_step
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


def format_row(row: dict) -> str:
    def cell(stats, key, fmt):
        if stats is None:
            return "—"
        if "error" in stats:
            return "error"
        return format(stats[key], fmt)

    a, b = row["peftbench"], row["plain"]
    ok = a and b and "error" not in a and "error" not in b
    speed = f"{a['samples_per_s'] / b['samples_per_s']:.2f}×" if ok else "—"
    memory = f"{a['peak_memory_mb'] / b['peak_memory_mb']:.2f}×" if ok else "—"
    return (f"| {row['arch']} | {row['lengths']} | {row['method']} | {row['precision']} | "
            f"{cell(a, 'samples_per_s', '.1f')} | {cell(b, 'samples_per_s', '.1f')} | {speed} | "
            f"{cell(a, 'tokens_per_s', '.0f')} | {cell(b, 'tokens_per_s', '.0f')} | "
            f"{cell(a, 'ms_per_step', '.1f')} | {cell(b, 'ms_per_step', '.1f')} | "
            f"{cell(a, 'peak_memory_mb', '.0f')} | {cell(b, 'peak_memory_mb', '.0f')} | {memory} | "
            f"{cell(a, 'mfu', '.1%')} | {cell(b, 'mfu', '.1%')} |")


HEADER = ("| arch | lengths | method | precision | samples/s peftbench | samples/s plain | speed ratio | "
          "real tok/s peftbench | real tok/s plain | ms/step peftbench | ms/step plain | peak MB peftbench | "
          "peak MB plain | memory ratio | MFU peftbench | MFU plain |\n" + "|---" * 16 + "|")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/throughput.py", description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--arch", default="bert-base-chinese" if gpu else "tiny",
                   help=f"random-init architecture: {', '.join(models.ARCHITECTURES)}, or a hub name/directory")
    p.add_argument("--methods", default="full,lora,adalora,adapter,prefix,ia3,bitfit", type=lambda s: s.split(","))
    p.add_argument("--precisions", default="bf16" if gpu else "no", type=lambda s: s.split(","),
                   help="comma list of no, bf16, fp16")
    p.add_argument("--lengths", default="fixed,tnews", type=lambda s: s.split(","),
                   help="fixed: every text fills --seq-len; tnews: FewCLUE TNEWS title lengths")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    p.add_argument("--compile", action="store_true", help="peftbench path with torch.compile")
    p.add_argument("--tnews-file", type=Path, help="FewCLUE tnews/train_few_all.json: real title lengths for "
                   "--lengths tnews (default: uniform 10-34 characters, close to their median 22 and p95 32)")
    p.add_argument("--out", help="also write the rows and the environment as JSON")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    print(f"{environment()['device_name']}, torch {torch.__version__}, {args.batch_size} × {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(HEADER, flush=True)
    rows = bench(args)
    if args.out:
        write_atomic(args.out, {"env": environment(), "args": vars(args), "rows": rows})
    return 0 if all(math.isfinite(r["peftbench"].get("samples_per_s", math.nan)) for r in rows if r["peftbench"]) else 1


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
