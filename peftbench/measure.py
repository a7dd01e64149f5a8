"""Honest measurement: synchronised clocks, warm-up left out, real (non-pad) tokens, peak memory."""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a clock read after it means 'done'."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class StepTimer:
    """Throughput of the timed optimizer steps.

    The first ``warmup_steps`` optimizer steps (allocator growth, kernel selection,
    lazy init) are not timed. The device is synchronised before every clock read;
    ``pause``/``resume`` keep evaluation out of the training time. Samples and
    tokens are counted per micro-batch and credited when their optimizer step ends.
    The process's CPU time over the same timed spans (``cpu_clock``) shows whether it had its cores: on a CPU,
    CPU seconds over wall seconds and threads is near 1 for a run alone on its cores.
    """

    def __init__(self, device: torch.device, warmup_steps: int, clock=time.perf_counter,
                 cpu_clock=time.process_time):
        self.device = device
        self.clock, self.cpu_clock = clock, cpu_clock
        self.warmup_steps = warmup_steps
        self.samples = self.tokens = self.steps = 0
        self.seconds = self.cpu_seconds = 0.0
        self._pending = [0, 0]
        self._t0: float | None = None  # set while the clock runs
        self._cpu0 = 0.0
        self._warm = False  # warm-up is over: time from now on
        if warmup_steps == 0:
            self._start()

    def _start(self) -> None:
        self._warm = True
        synchronize(self.device)
        self._t0, self._cpu0 = self.clock(), self.cpu_clock()

    def count(self, samples: int, tokens: int) -> None:
        self._pending[0] += samples
        self._pending[1] += tokens

    def optimizer_step(self, step: int) -> None:
        if step > self.warmup_steps:
            self.samples += self._pending[0]
            self.tokens += self._pending[1]
            self.steps += 1
        self._pending = [0, 0]
        if step == self.warmup_steps:
            self._start()

    def pause(self) -> None:
        if self._t0 is not None:
            synchronize(self.device)
            self.seconds += self.clock() - self._t0
            self.cpu_seconds += self.cpu_clock() - self._cpu0
            self._t0 = None

    def resume(self) -> None:
        if self._warm:
            self._start()

    def result(self) -> dict:
        self.pause()
        return {"timed_steps": self.steps, "timed_seconds": self.seconds, "timed_samples": self.samples,
                "timed_tokens": self.tokens, "timed_cpu_seconds": self.cpu_seconds}


@torch.inference_mode()
def inference_cost(model, single: dict, batches: list[dict], device: torch.device, calls: int = 50,
                   warmup: int = 10, autocast=contextlib.nullcontext) -> dict:
    """What serving ``model`` costs: the latency of one sequence (``single``, a collated batch of one; p50 and
    p95 over ``calls`` timed calls after ``warmup`` untimed ones) and the throughput over ``batches`` (after
    one untimed batch), in samples and real tokens per second. Inputs are moved to ``device`` inside the
    timed region, as a server moves them; the device is synchronised before every clock read."""

    def forward(batch):
        with autocast():
            model(**{k: v.to(device) for k, v in batch["inputs"].items()})

    for _ in range(warmup):
        forward(single)
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        forward(single)
        synchronize(device)
        times.append(time.perf_counter() - start)
    forward(batches[0])
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        forward(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    percent = statistics.quantiles(times, n=100, method="inclusive")
    samples = sum(len(b["id"]) for b in batches)
    return {"latency_ms_p50": 1e3 * statistics.median(times), "latency_ms_p95": 1e3 * percent[94],
            "latency_calls": calls, "latency_tokens": single["num_tokens"],
            "batch_size": len(batches[0]["id"]), "samples_per_s": samples / seconds,
            "tokens_per_s": sum(b["num_tokens"] for b in batches) / seconds}


def _cpu_peak_rss_mb() -> float:
    """VmHWM (peak resident set) from /proc; falls back to getrusage's lifetime maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator statistics, or the process's peak RSS on Linux (/proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process lifetime


def peak_memory_mb(device: torch.device) -> dict:
    """GPU: max allocated and max reserved since the reset. CPU: peak resident set size since the reset."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                "memory_kind": "cuda_max_allocated"}
    return {"peak_memory_mb": _cpu_peak_rss_mb(), "memory_kind": "cpu_peak_rss"}


def model_shape(model: torch.nn.Module, per_step_modules: tuple[str, ...] = ()) -> dict:
    """Non-embedding parameter count, trained non-embedding count, layers and width, for :func:`train_flops`.
    Embedding lookups (any ``nn.Embedding``, and an encoder's ``embeddings`` block) and ``per_step_modules``
    (virtual-token encoders: run once per step, not per token) are left out."""
    skip = ("embeddings", *per_step_modules)
    lookups = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    total = trained = 0
    for name, param in model.named_parameters():
        if any(part in name for part in skip) or id(param) in lookups:
            continue
        total += param.numel()
        trained += param.numel() if param.requires_grad else 0
    cfg = model.config
    return {"n_params": total, "n_trained": trained, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size}


def train_flops(shape: dict, lengths: list[int]) -> float:
    """Training FLOPs for sequences of ``lengths`` real tokens (see docs/performance.md):
    2N (forward) + 2N (input gradients) + 2N_trained (weight gradients) per token, plus
    attention 12 * layers * hidden * s^2 per sequence (forward and backward of QK^T and AV)."""
    tokens = sum(lengths)
    dense = (4 * shape["n_params"] + 2 * shape["n_trained"]) * tokens
    attention = 12 * shape["layers"] * shape["hidden"] * sum(s * s for s in lengths)
    return dense + attention


def forward_flops(model: torch.nn.Module, batch: dict) -> int:
    """FLOPs of one forward pass on ``batch`` (matmuls and attention), counted by torch's ``FlopCounterMode``,
    which counts CPU attention too here (its fused CPU kernel has no formula of its own)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        model(**batch)
    return counter.get_total_flops()


def base_forward_flops(model_class, config, input_ids: torch.Tensor) -> int:
    """FLOPs of the plain architecture (``model_class`` from ``config``, no method) on one unpadded
    sequence, built and run on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        base = model_class.from_config(config)
    return forward_flops(base.eval(), {"input_ids": input_ids.to("meta")})


def peak_matmul_flops(dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul FLOP/s of this machine's device in ``dtype`` (the MFU denominator)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def stored_bytes(param: torch.Tensor) -> int:
    """Bytes a weight occupies: its storage plus bitsandbytes' quantisation constants (int8 row scales,
    4-bit block scales and their own constants under double quantisation)."""
    total = param.numel() * param.element_size()
    scales = getattr(param, "SCB", None)  # LLM.int8: one fp32 scale per row
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    state = getattr(param, "quant_state", None)  # 4-bit: block absmax, nested state when double-quantised
    while state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        state = getattr(state, "state2", None)
    return total


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Each parameter once (tied weights are one tensor)."""
    return list({id(p): p for p in model.parameters()}.values())
