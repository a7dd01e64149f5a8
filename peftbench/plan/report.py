"""A plan as the table ``peftbench plan`` prints."""

from __future__ import annotations

from peftbench.plan.devices import GIB


def base_words(cfg) -> str:
    """How the frozen base weights are stored, in words."""
    if cfg.model.quantization != "none":
        return {"8bit": "8-bit (LLM.int8)", "4bit": "4-bit NF4"}[cfg.model.quantization]
    return {"bf16": "bf16", "fp16": "fp16"}.get(cfg.train.mixed_precision, "fp32")


def format_plan(result: dict) -> str:
    mib = 2**20
    budget = result["memory_budget"]
    head = (f"{result['task']}: {result['examples']} training examples; {result['device']}, "
            f"{result['flops_per_s'] / 1e12:.2f} TFLOP/s; precision {result['precision']}, base weights "
            f"{result['base_weights']}"
            + (f"; budget {budget / GIB:.1f} GiB" if budget and budget >= GIB else
               f"; budget {budget / mib:.0f} MiB" if budget else "")
            + (f"; per process of {result['processes']} ({result['strategy']})" if result.get("processes", 1) > 1
               else ""))
    lines = [head, "", "| method | base MiB | trained MiB | gradients MiB | optimizer MiB | activations MiB | "
             "total MiB | ms/step ≥ | samples/s ≤ |" + (" fits | recommendation |" if budget else ""),
             "|---" * (11 if budget else 9) + "|"]
    for row in result["rows"]:
        m = row["memory"]
        cells = [row["method"], *(f"{m[k] / mib:.1f}" for k in ("base_weights", "trained_weights", "gradients",
                                                                  "optimizer_state", "activations", "total")),
                 f"{row['ms_per_step']:.1f}", f"{row['samples_per_s']:.0f}"]
        if budget:
            cells += ["yes" if row["fits"] else "no", row["recommend"] or "as is"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Activations at the longest batch ({result['rows'][0]['longest']} tokens); step time at the "
                 "dense matmul rate, a lower bound (docs/planning.md).")
    return "\n".join(lines)
