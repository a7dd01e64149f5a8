"""Training throughput: peftbench's loop beside the loops users would otherwise run.

    python benchmarks/throughput.py --arch bert-base-chinese --precisions bf16 --lengths fixed,tnews

For every method
and precision, on a random-init model of a given architecture (weights do not
change speed), it trains the same texts through

- **peftbench**: ``train.run`` itself (length-grouped dynamic padding, frozen weights in
  the compute dtype, fused AdamW on GPU, pinned non-blocking batches, no host sync in
  the step, optional ``torch.compile``),
- **plain** (``--baselines``): a transformers model + PEFT + ``torch.optim.AdamW`` under
  autocast (fp32 weights), every batch padded to ``--seq-len`` (what ``run_glue``-style
  scripts do by default), and
- **trainer**: the Hugging Face ``Trainer`` set up as an expert would: dynamic padding
  (``DataCollatorWithPadding``), length-grouped sampling, the same precision, fused AdamW
  on GPU, the same batch, steps, learning rate and schedule, PEFT's method,

in one process, and prints samples/s, real-token/s, ms/step, peak memory and MFU
with the ratios peftbench / baseline. Clocks are read after a device synchronise
(a ``TrainerCallback`` does it for the Trainer); the first ``--warmup`` steps are not timed.
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
from peftbench.measure import (
    StepTimer,
    inference_cost,
    model_shape,
    peak_matmul_flops,
    peak_memory_mb,
    reset_peak_memory,
    train_flops,
)
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
    inference = result.record.get("inference") or {}
    stats["inference"] = {k: inference[k] for k in ("as_trained", "merged") if k in inference}
    del result, model
    return stats


def baseline_model(arch: str, method: str, data_dir: Path, total_steps: int):
    """The baselines' model: transformers' random-init ``arch`` with PEFT's ``method`` (none for ``full``), the
    vocabulary the peftbench path builds, and the training texts and labels."""
    rows = [json.loads(line) for line in (data_dir / "train_few_all.json").read_text(encoding="utf-8").splitlines()]
    texts, labels = [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
    tokenizer = models.char_tokenizer(texts)
    torch.manual_seed(0)
    model = models.load_model(config.ModelConfig(name_or_path=f"random:{arch}"), ["0", "1", "2", "3"], tokenizer)[0]
    if method != "full":
        from peft import get_peft_model

        m = get_method(method)(config.load(None, [f"method.name={method}", *method_overrides(method)]).method)
        model = get_peft_model(model, m.peft_config(RunContext(total_steps=total_steps, num_labels=4)))
    return model, tokenizer, texts, labels


def plain_step(arch: str, method: str, precision: str, data_dir: Path, args) -> dict:
    """The plain loop: transformers + PEFT + AdamW under autocast, batches padded to ``seq_len``, in file order."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, texts, _ = baseline_model(arch, method, data_dir, args.warmup + args.steps)
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
    stats = baseline_stats(model, method, timer.result(), peak_memory_mb(device))
    model.eval()
    stats["inference"] = {"plain": plain_inference(model, tokenizer, data_dir, args.seq_len, device, dtype)}
    return stats


def plain_inference(model, tokenizer, data_dir: Path, seq_len: int, device: torch.device, dtype) -> dict:
    """The serving cost of the PEFT model as users run it: fp32 weights under autocast, every batch padded to
    ``seq_len``; the texts, batch size and single sequence of peftbench's own measurement (the dev split in
    file order, batches of ``eval_batch_size``, the median-length text)."""
    texts = [json.loads(line)["sentence"] for line in (data_dir / "dev_few_all.json").read_text().splitlines()]
    size = config.TrainConfig().eval_batch_size

    def collate(chunk):
        inputs = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return {"inputs": inputs, "id": list(range(len(chunk))), "num_tokens": int(inputs["attention_mask"].sum())}

    single = collate([sorted(texts, key=len)[len(texts) // 2]])
    batches = [collate(texts[i : i + size]) for i in range(0, len(texts), size)]
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    return inference_cost(model, single, batches, device, autocast=autocast)


def trainer_step(arch: str, method: str, precision: str, data_dir: Path, args, out_dir: Path) -> dict:
    """The Hugging Face Trainer as an expert sets it up: dynamic padding, length-grouped sampling, the same
    precision, batch, steps and schedule as peftbench (linear, 10 % warm-up, weight decay 0.01, clipping at 1),
    fused AdamW on GPU; a callback times the optimizer steps after a device synchronise."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    total = args.warmup + args.steps
    model, tokenizer, texts, labels = baseline_model(arch, method, data_dir, total)
    encoded = tokenizer(texts, truncation=True, max_length=args.seq_len)
    dataset = Dataset.from_dict({**encoded, "labels": labels, "length": [len(ids) for ids in encoded["input_ids"]]})
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None)
    batch_counts = []  # (samples, real tokens) of every collated batch, in the order the steps use them

    def counted(features):
        batch = collate([{k: v for k, v in f.items() if k != "length"} for f in features])
        batch_counts.append((len(features), int(batch["attention_mask"].sum())))
        return batch

    timer = StepTimer(device, warmup_steps=args.warmup)

    class Clock(TrainerCallback):
        def on_optimizer_step(self, targs, state, control, **kwargs):
            if method == "adalora":  # PEFT's AdaLoRA needs its budget update while the gradients exist
                kwargs["model"].base_model.update_and_allocate(state.global_step + 1)

        def on_step_end(self, targs, state, control, **kwargs):
            timer.count(*batch_counts[state.global_step - 1])
            timer.optimizer_step(state.global_step)

    training = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=args.batch_size, max_steps=total, learning_rate=1e-4,
        lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0,
        train_sampling_strategy="group_by_length", bf16=precision == "bf16", fp16=precision == "fp16",
        optim="adamw_torch_fused" if cuda else "adamw_torch", use_cpu=not cuda, torch_compile=args.compile,
        save_strategy="no", logging_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=cuda, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=counted, callbacks=[Clock()])
    reset_peak_memory(device)
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary would land in the table
    trainer.train()
    stats = baseline_stats(trainer.model, method, timer.result(), peak_memory_mb(device))
    del trainer
    return stats


def baseline_stats(model, method: str, timing: dict, memory: dict) -> dict:
    return {"samples_per_s": timing["timed_samples"] / timing["timed_seconds"],
            "tokens_per_s": timing["timed_tokens"] / timing["timed_seconds"],
            "ms_per_step": 1000 * timing["timed_seconds"] / timing["timed_steps"],
            "timed_steps": timing["timed_steps"], "peak_memory_mb": memory["peak_memory_mb"],
            **model_shape(model, get_method(method).virtual_token_modules)}


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
                    for name in ("peftbench", *args.baselines):
                        if name != "peftbench" and method not in PLAIN_PEFT:
                            row[name] = None
                            continue
                        try:
                            if name == "peftbench":
                                stats = peftbench_step(args.arch, method, precision, data_dir, args, Path(tmp) / "run")
                            elif name == "plain":
                                stats = plain_step(args.arch, method, precision, data_dir, args)
                            else:
                                stats = trainer_step(args.arch, method, precision, data_dir, args, Path(tmp) / "hf")
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
                    print(format_row(row, args.baselines), flush=True)
    return rows


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    ok = a and b and "error" not in a and "error" not in b
    return f"{a[key] / b[key]:.2f}×" if ok else "—"


def cell(stats: dict | None, key: str, fmt: str) -> str:
    if stats is None:
        return "—"
    return "error" if "error" in stats else format(stats[key], fmt)


def format_row(row: dict, baselines: list[str]) -> str:
    a = row["peftbench"]
    cells = [row["arch"], row["lengths"], row["method"], row["precision"], cell(a, "samples_per_s", ".1f")]
    cells += [x for b in baselines for x in (cell(row[b], "samples_per_s", ".1f"), ratio(a, row[b], "samples_per_s"))]
    cells += [cell(a, "tokens_per_s", ".0f"), cell(a, "ms_per_step", ".1f"), cell(a, "peak_memory_mb", ".0f")]
    cells += [x for b in baselines for x in (cell(row[b], "peak_memory_mb", ".0f"), ratio(a, row[b], "peak_memory_mb"))]
    cells += [cell(a, "mfu", ".1%")] + [cell(row[b], "mfu", ".1%") for b in baselines]
    return "| " + " | ".join(cells) + " |"


def header(baselines: list[str]) -> str:
    names = ["arch", "lengths", "method", "precision", "samples/s peftbench"]
    names += [x for b in baselines for x in (f"samples/s {b}", f"speed ×{b}")]
    names += ["real tok/s peftbench", "ms/step peftbench", "peak MB peftbench"]
    names += [x for b in baselines for x in (f"peak MB {b}", f"memory ×{b}")]
    names += ["MFU peftbench"] + [f"MFU {b}" for b in baselines]
    return "| " + " | ".join(names) + " |\n" + "|---" * len(names) + "|"


def baseline_list(text: str) -> list[str]:
    names = [b for b in text.split(",") if b]
    unknown = sorted(set(names) - {"plain", "trainer"})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline {unknown[0]!r}: choose from plain, trainer")
    return names


def inference_table(rows: list[dict]) -> str:
    """Serving cost of the methods that merge: peftbench's model as trained (dynamic padding, frozen weights in
    the compute dtype), merged, and the plain PEFT model (padded to --seq-len); latency of one median-length
    text and samples/s over the dev texts."""
    lines = ["| arch | lengths | method | precision | p50 ms peftbench | p50 ms merged | p50 ms plain PEFT | "
             "samples/s peftbench | samples/s merged | samples/s plain PEFT | merged × plain PEFT |",
             "|---" * 11 + "|"]
    for row in rows:
        ours = (row["peftbench"] or {}).get("inference", {})
        plain = ((row.get("plain") or {}).get("inference") or {}).get("plain")
        if "merged" not in ours or plain is None:
            continue
        a, m = ours["as_trained"], ours["merged"]
        lines.append(f"| {row['arch']} | {row['lengths']} | {row['method']} | {row['precision']} | "
                     f"{a['latency_ms_p50']:.2f} | {m['latency_ms_p50']:.2f} | {plain['latency_ms_p50']:.2f} | "
                     f"{a['samples_per_s']:.0f} | {m['samples_per_s']:.0f} | {plain['samples_per_s']:.0f} | "
                     f"{m['samples_per_s'] / plain['samples_per_s']:.2f}× |")
    return "\n".join(lines) if len(lines) > 2 else ""


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
    p.add_argument("--baselines", default="plain,trainer", type=baseline_list,
                   help="comma list of plain (padded to --seq-len) and trainer (Hugging Face Trainer)")
    p.add_argument("--compile", action="store_true", help="peftbench path (and the Trainer's) with torch.compile")
    p.add_argument("--tnews-file", type=Path, help="FewCLUE tnews/train_few_all.json: real title lengths for "
                   "--lengths tnews (default: uniform 10-34 characters, close to their median 22 and p95 32)")
    p.add_argument("--out", help="also write the rows and the environment as JSON")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    print(f"{environment()['device_name']}, torch {torch.__version__}, {args.batch_size} × {args.seq_len}, "
          f"{args.steps} timed steps after {args.warmup}")
    print(header(args.baselines), flush=True)
    rows = bench(args)
    served = inference_table(rows)
    if served:
        print("\nInference\n\n" + served)
    if args.out:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        write_atomic(args.out, {"env": environment(), "args": settings, "rows": rows})
    return 0 if all(math.isfinite(r["peftbench"].get("samples_per_s", math.nan)) for r in rows if r["peftbench"]) else 1


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
