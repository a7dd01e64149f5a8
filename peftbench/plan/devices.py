"""Devices the planner knows (memory, dense matmul rate) and memory sizes as people write them."""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.errors import PeftbenchError

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    dense_flops: dict  # precision ("no" = fp32, "bf16", "fp16") -> published dense matmul FLOP/s


# Published dense (not sparse) tensor-core peaks; fp32 without TF32 (PyTorch's default for matmuls).
DEVICES = {
    "h200": Device("NVIDIA H200 SXM", 141 * 10**9, {"no": 67e12, "bf16": 989e12, "fp16": 989e12}),
    "h100": Device("NVIDIA H100 SXM", 80 * GIB, {"no": 67e12, "bf16": 989e12, "fp16": 989e12}),
    "a100": Device("NVIDIA A100 80GB", 80 * GIB, {"no": 19.5e12, "bf16": 312e12, "fp16": 312e12}),
    "a100-40gb": Device("NVIDIA A100 40GB", 40 * GIB, {"no": 19.5e12, "bf16": 312e12, "fp16": 312e12}),
    "l4": Device("NVIDIA L4", 24 * GIB, {"no": 30.3e12, "bf16": 121e12, "fp16": 121e12}),
    "a10": Device("NVIDIA A10", 24 * GIB, {"no": 31.2e12, "bf16": 125e12, "fp16": 125e12}),
    "rtx4090": Device("NVIDIA RTX 4090", 24 * GIB, {"no": 82.6e12, "bf16": 165e12, "fp16": 165e12}),
    "v100": Device("NVIDIA V100 32GB", 32 * GIB, {"no": 15.7e12, "fp16": 125e12}),
    "t4": Device("NVIDIA T4", 16 * GIB, {"no": 8.1e12, "fp16": 65e12}),
}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24GB``, ``512MiB`` or a plain number of bytes."""
    units = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "kib": 2**10, "kb": 10**3, "b": 1, "": 1}
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):
        size = 0
    if size < 1:
        raise PeftbenchError(f"--memory: {text!r} is not a size of at least one byte (examples: 80GiB, 24GB, 512MiB)")
    return size
