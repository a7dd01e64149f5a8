"""The first setting that fits a memory budget: batch, accumulation, checkpointing, quantisation and
sharding tried in order, each estimated, and its step time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftbench.config import TrainConfig
from peftbench.config.checks import takes_quantized_base
from peftbench.errors import PeftbenchError
from peftbench.plan.activations import activations
from peftbench.plan.devices import DEVICES
from peftbench.plan.memory import STRATEGIES, meta_model, quantized_bytes, static_bytes
from peftbench.plan.report import base_words


@dataclass
class Setting:
    """What the recommendation may change: the micro-batch, accumulation, checkpointing, the base's bits."""

    batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: bool
    quantization: str

    def overrides(self) -> str:
        return (f"train.batch_size={self.batch_size} train.grad_accum_steps={self.grad_accum_steps} "
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()} "
                f"model.quantization={self.quantization}")


@dataclass(frozen=True)
class Sharding:
    """How the run's processes hold the model (``static_bytes``)."""

    processes: int = 1
    strategy: str = "ddp"
    whole_trained: bool = False  # the method's trained tensors stay whole under fsdp (AdaLoRA)


def estimate(model: nn.Module, setting: Setting, seq_len: int, kind: str, precision: str,
             sharding: Sharding = Sharding()) -> dict:
    """Bytes one process holds in a training step at ``setting`` with micro-batches padded to ``seq_len``
    (``train.batch_size`` is per process: so are the activations)."""
    parts = static_bytes(model, sharding.processes, sharding.strategy, sharding.whole_trained)
    if setting.quantization != "none":
        split = sharding.processes if sharding.strategy in ("fsdp", "zero3") else 1
        parts["base_weights"] = math.ceil(quantized_bytes(model, setting.quantization) / split)
    acts = activations(model, setting.batch_size, seq_len, kind, precision, setting.gradient_checkpointing)
    parts["activations"] = acts["saved"] + acts["recompute"]
    parts["total"] = sum(parts.values())
    return parts


def step_seconds(model: nn.Module, method: str, batches: list[list[int]], flops_per_s: float) -> float:
    """Mean seconds per optimizer step at ``flops_per_s``: the FLOP formula of docs/performance.md over each
    batch padded to its longest sequence (padding costs compute too)."""
    from peftbench.measure import model_shape, train_flops
    from peftbench.methods import get_method

    shape = model_shape(model, get_method(method).virtual_token_modules)
    per_batch = [train_flops(shape, [max(b)] * len(b)) for b in batches]
    return sum(per_batch) / len(per_batch) / flops_per_s


def candidates(setting: Setting, can_quantize: bool):
    """The configured setting, then ever cheaper ones with the same effective batch."""
    yield setting
    bits = [setting.quantization] + (["8bit", "4bit"] if can_quantize and setting.quantization == "none" else [])
    for quantization in bits:
        batch, accum = setting.batch_size, setting.grad_accum_steps
        while True:
            for ckpt in (False, True):
                yield Setting(batch, accum, ckpt or setting.gradient_checkpointing, quantization)
            if batch == 1:
                break
            batch, accum = math.ceil(batch / 2), accum * 2


UNMODELLED_TRICKS = ("rdrop_alpha", "adversarial", "ema_decay", "swa_last")  # extra passes or weight copies
TRICK_DEFAULTS = {key: getattr(TrainConfig, key) for key in UNMODELLED_TRICKS}


def plan_method(cfg, lengths: list[int], num_labels: int, vocab_size: int, kind: str, flops_per_s: float,
                budget: int | None, processes: int = 1, strategy: str = "ddp") -> dict:
    """One method's plan: the memory breakdown at the recipe's setting, the step time, and (with a budget) the
    first setting that fits."""
    from peftbench.data import LengthGroupedBatchSampler
    from peftbench.methods import get_method

    t = cfg.train
    steps_per_epoch = math.ceil(len(lengths) / processes / t.batch_size / t.grad_accum_steps)  # each process's
    total_steps = t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch  # as the run counts them
    model = meta_model(cfg, vocab_size, num_labels, total_steps)
    multiple = 8 if kind == "cuda" else 1
    longest = math.ceil(max(lengths) / multiple) * multiple
    setting = Setting(t.batch_size, t.grad_accum_steps, t.gradient_checkpointing, cfg.model.quantization)
    sharding = Sharding(processes, strategy, get_method(cfg.method.name).reads_gradients)
    parts = estimate(model, setting, longest, kind, t.mixed_precision, sharding)
    order = LengthGroupedBatchSampler(lengths, t.batch_size, t.seed, t.group_by_length)
    batches = [[math.ceil(lengths[i] / multiple) * multiple for i in b] for b in order]
    seconds = step_seconds(model, cfg.method.name, batches, flops_per_s) * t.grad_accum_steps
    out = {"method": cfg.method.name, "memory": parts, "longest": longest,
           "ms_per_step": 1000 * seconds, "samples_per_s": t.batch_size * t.grad_accum_steps / seconds}
    if budget is not None:
        out["fits"] = parts["total"] <= budget
        for option in candidates(setting, takes_quantized_base(cfg)):
            option_parts = parts if option == setting else estimate(model, option, longest, kind, t.mixed_precision,
                                                                    sharding)
            if option_parts["total"] <= budget:
                out["recommend"] = None if option == setting else option.overrides()
                out["recommend_total"] = option_parts["total"]
                break
        else:
            out["recommend"] = "nothing fits: a smaller backbone or shorter task.max_length"
    return out


def plan(cfg, methods: list[str], device: str | None = None, memory: int | None = None, processes: int = 1,
         strategy: str = "ddp") -> dict:
    """Plans for ``methods`` under the recipe ``cfg`` on ``device`` (a name of :data:`DEVICES`, ``cpu``, or
    None: this machine's device, its matmul rate measured now), per process of ``processes`` under ``strategy``
    (one of :data:`STRATEGIES`)."""
    if strategy not in STRATEGIES or processes < 1:
        raise PeftbenchError(f"--strategy {strategy} --processes {processes}: a strategy of {', '.join(STRATEGIES)} "
                             "and at least one process")
    unmodelled = [f"train.{key}" for key in UNMODELLED_TRICKS if getattr(cfg.train, key) != TRICK_DEFAULTS[key]]
    unmodelled += ["train.distill.teacher"] if cfg.train.distill.teacher else []
    if unmodelled:
        raise PeftbenchError(f"{', '.join(unmodelled)}: peftbench plan does not model this trick's extra passes and "
                             "copies yet; plan the recipe without it")
    from peftbench import config as config_module
    from peftbench.measure import peak_matmul_flops
    from peftbench.train import encode_task

    precision = cfg.train.mixed_precision
    if device in DEVICES:
        spec = DEVICES[device]
        if precision not in spec.dense_flops:
            raise PeftbenchError(f"--device {device}: {spec.name} has no {precision} tensor cores "
                                 f"(train.mixed_precision: {', '.join(spec.dense_flops)})")
        kind, rate, where = "cuda", spec.dense_flops[precision], f"{spec.name} (published dense peak)"
        memory = memory if memory is not None else spec.memory_bytes
    elif device in (None, "cpu", "here"):
        here = "cuda" if torch.cuda.is_available() and device != "cpu" else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kind, rate, where = here, peak_matmul_flops(dtype), f"this machine's {here} (matmul rate measured now)"
    else:
        raise PeftbenchError(f"--device {device!r}: one of cpu, {', '.join(DEVICES)}")
    task, tokenizer, _, encoded = encode_task(cfg, ("train",))
    lengths = list(encoded["train"]["length"])
    labels = len(task.spec.model_labels())
    base = cfg.to_dict()
    rows = []
    for name in methods:
        method_cfg = cfg if name == cfg.method.name else config_module.resolve({**base, "method": {"name": name}})
        rows.append(plan_method(method_cfg, lengths, labels, len(tokenizer), kind, rate, memory, processes, strategy))
    return {"device": where, "kind": kind, "flops_per_s": rate, "memory_budget": memory, "precision": precision,
            "task": cfg.task.name, "examples": len(lengths), "base_weights": base_words(cfg), "rows": rows,
            "processes": processes, "strategy": strategy}
