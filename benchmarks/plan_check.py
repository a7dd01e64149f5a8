"""The planner's activation formula against what autograd saves, for every method (docs/planning.md).

    python benchmarks/plan_check.py                      # CPU: tiny, mini, bert-base-shaped, qwen2-small; fp32
    python benchmarks/plan_check.py --precision bf16     # under autocast (GPU: bf16 mixed)

Each cell builds a random-init model of the architecture with the method applied, runs one training forward
pass and counts the bytes of the tensors autograd saves (``saved_tensors_hooks``, each storage once,
parameters left out); the planner predicts them from the model's structure alone. On a GPU it also runs the
whole step (forward, backward, AdamW) and compares ``torch.cuda.max_memory_allocated`` with the planner's
total (weights, gradients, optimizer state, activations). Prints one Markdown row per cell.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from precision_matrix import QWEN2_SMALL

from peftbench import config, models, plan
from peftbench.methods import RunContext, get_method, set_trainable, settle_dtypes
from peftbench.records import environment, write_atomic

METHODS = ["full", "lora", "adalora", "ia3", "prompt", "prefix", "prefix:method.reparameterize=false",
           "adapter", "adapter:method.variant=pfeiffer", "adapter:method.variant=ffn", "bitfit"]


def cell(base, spec: str, batch: int, length: int, precision: str, device: torch.device) -> dict:
    name, *overrides = spec.split(":")
    model = copy.deepcopy(base)
    method = get_method(name)(config.load(None, [f"method.name={name}", *overrides]).method)
    model = method.apply(model, RunContext(total_steps=10, num_labels=4))
    set_trainable(model, method)
    settle_dtypes(model, precision)
    model.to(device).train()
    ids = torch.randint(5, base.config.vocab_size, (batch, length), device=device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[0, length // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(batch, dtype=torch.long, device=device)}
    if base.config.model_type == "bert":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    real = plan.count_saved(model, inputs, dtype)
    predicted = plan.activations(model, batch, length, device.type, precision)["saved"]
    row = {"method": spec.replace(":method.", " "), "batch": batch, "length": length, "saved": real,
           "predicted": predicted, "error": predicted / real - 1}
    if device.type == "cuda":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        for _ in range(2):  # the second step has the optimizer state
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        static = plan.static_bytes(model)
        total = sum(static.values()) + predicted
        row.update(peak=torch.cuda.max_memory_allocated(device), total=total,
                   total_error=total / torch.cuda.max_memory_allocated(device) - 1)
    del model
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/plan_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="tiny,mini,bert-base-chinese,qwen2-small", type=lambda s: s.split(","),
                   help="random-init BERT architectures (peftbench.models.ARCHITECTURES) and qwen2-small, a decoder")
    p.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
    p.add_argument("--precision", default="no", help="no, bf16, fp16")
    p.add_argument("--shapes", default="2x16,2x64,8x16,8x64", help="batch x length pairs")
    p.add_argument("--out", help="also write the rows and the environment as JSON")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    print(f"{env['device_name']}, torch {torch.__version__}, transformers {env['transformers']}, "
          f"peft {env['peft']}; precision {args.precision}")
    gpu = device.type == "cuda"
    print("| arch | method | batch | length | saved MiB | predicted MiB | error |"
          + (" peak MiB | planned MiB | error |" if gpu else ""))
    print("|---" * (10 if gpu else 7) + "|")
    tokenizer = models.char_tokenizer(["北京欢迎你来上海看看"])
    worst, rows = 0.0, []
    for arch in args.archs:
        torch.manual_seed(0)
        if arch == "qwen2-small":  # the decoder of precision_matrix.py
            from transformers import Qwen2Config, Qwen2ForSequenceClassification

            base = Qwen2ForSequenceClassification(Qwen2Config(vocab_size=64, pad_token_id=0, num_labels=4,
                                                              **QWEN2_SMALL))
        else:
            name = "tiny" if arch == "tiny" else f"random:{arch}"
            base = models.load_model(config.ModelConfig(name_or_path=name), ["0", "1", "2", "3"], tokenizer)[0]
        for spec in args.methods:
            if arch == "qwen2-small" and "pfeiffer" in spec:
                continue  # Pfeiffer's adapter needs a post-LN block
            for shape in args.shapes.split(","):
                batch, length = (int(x) for x in shape.split("x"))
                row = cell(base, spec, batch, length, args.precision, device)
                rows.append({"arch": arch, **row})
                worst = max(worst, abs(row["error"]), abs(row.get("total_error", 0)))
                line = (f"| {arch} | {row['method']} | {batch} | {length} | {row['saved'] / 2**20:.2f} | "
                        f"{row['predicted'] / 2**20:.2f} | {row['error']:+.1%} |")
                if gpu:
                    line += f" {row['peak'] / 2**20:.1f} | {row['total'] / 2**20:.1f} | {row['total_error']:+.1%} |"
                print(line, flush=True)
    print(f"\nworst |error| {worst:.1%} (target: within 15 %)")
    if args.out:
        write_atomic(args.out, {"env": env, "precision": args.precision, "worst_error": worst, "rows": rows})
    return 0 if worst <= 0.15 else 1


if __name__ == "__main__":
    sys.exit(main())
