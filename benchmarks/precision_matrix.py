"""Every method × precision × quantised base, a few steps each: does it run, how fast, how much memory.

    python benchmarks/precision_matrix.py                                   # GPU: bert-base + a small decoder
    python benchmarks/precision_matrix.py --arch tiny --precisions no,bf16  # CPU

Each cell is ``peftbench run`` on the synthetic task (random init of the architecture; ``qwen2-small``
is a 4-layer Qwen2 built here), ``--steps`` optimizer steps, no checkpoint. Prints one Markdown row
per cell: method, precision, quantisation, ok or the error, samples/s, peak memory, base-weight MB.
``full`` on a quantised base is refused by design, and shown as such.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from peftbench import config, models
from peftbench.errors import PeftbenchError
from peftbench.methods import method_names
from peftbench.records import environment, write_atomic
from peftbench.tasks.synthetic import generate_splits
from peftbench.train import run

QWEN2_SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 704}


def qwen2_small(root: Path) -> str:
    """A random-init Qwen2 sequence classifier with a char tokenizer, saved as a model directory."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    tok = models.char_tokenizer([r["sentence"] for r in generate_splits()["train"]])
    tok.model_input_names = ["input_ids", "attention_mask"]  # decoders take no token types
    tok.save_pretrained(str(root))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, num_labels=4, **QWEN2_SMALL)
    Qwen2ForSequenceClassification(cfg).save_pretrained(str(root))
    return str(root)


def cell(backbone: str, method: str, precision: str, quantization: str, args, out_dir: Path) -> dict:
    row = {"backbone": args.label[backbone], "method": method, "precision": precision, "quantization": quantization}
    try:
        cfg = config.load(None, [
            "task.name=synthetic", f"task.max_train_samples={args.batch_size * (args.steps + 2)}",
            f"task.max_length={args.seq_len}", f"model.name_or_path={backbone}", f"method.name={method}",
            f"model.quantization={quantization}", f"train.mixed_precision='{precision}'", "train.epochs=1",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.lr=1e-4",
            "train.timing_warmup_steps=2", "train.save_checkpoint=false", "train.measure_inference=false",
            "train.evaluate_test=false", f"output_dir={out_dir}"])
        rec = run(cfg).record
    except PeftbenchError as exc:  # refused by design (full fine-tuning of a quantised base), before any work
        return {**row, "status": "refused", "error": str(exc)}
    except Exception as exc:  # a cell that crashes is a result of this benchmark, not its end
        return {**row, "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    m = rec["metrics"]
    return {**row, "status": "ok", "samples_per_s": m["train_samples_per_s"], "peak_memory_mb": m["peak_memory_mb"],
            "base_mb": rec["precision"]["base_weight_bytes"] / 2**20}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="bert-base-chinese,qwen2-small",
                        help="comma list: names of peftbench.models.ARCHITECTURES, qwen2-small, or model directories")
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--quantizations", default="none,8bit,4bit")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", help="also write the rows and the environment as JSON")
    args = parser.parse_args(argv)
    env = environment(1)
    print(f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
          f"bitsandbytes {env['bitsandbytes']}; {args.steps} steps of {args.batch_size} × ≤{args.seq_len}")
    print("| backbone | method | precision | quantisation | status | samples/s | peak MB | base weights MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        backbones, args.label = [], {}
        for arch in args.arch.split(","):
            name = qwen2_small(Path(tmp) / arch) if arch == "qwen2-small" else (
                f"random:{arch}" if arch in models.ARCHITECTURES else arch)
            backbones.append(name)
            args.label[name] = arch
        for backbone in backbones:
            for method in args.methods.split(","):
                for precision in args.precisions.split(","):
                    for quantization in args.quantizations.split(","):
                        r = cell(backbone, method, precision, quantization, args, Path(tmp) / "run")
                        rows.append(r)
                        ok = r["status"] == "ok"
                        print(f"| {r['backbone']} | {method} | {precision} | {quantization} | {r['status']} | "
                              + (f"{r['samples_per_s']:.0f} | {r['peak_memory_mb']:.0f} | {r['base_mb']:.1f} |"
                                 if ok else "— | — | — |"), flush=True)
    if args.out:
        write_atomic(args.out, {"env": env, "rows": rows})
    return rows


if __name__ == "__main__":
    sys.exit(0 if not any(r["status"].startswith("error") for r in main()) else 1)
