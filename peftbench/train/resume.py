"""Resuming a killed run: its training state loaded back into the model, optimizer, method, averager and dev
history, and its RNG restored where the interrupted epoch drew from it."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from peftbench import checkpoint, tricks
from peftbench.config import RunConfig
from peftbench.errors import PeftbenchError
from peftbench.loop import LoopState
from peftbench.methods import Method


def resume(cfg: RunConfig, accelerator: Accelerator, raw_model, optimizer, method: Method,
            averager: tricks.Averager | None, state_dir: Path, history: list,
            best: dict) -> tuple[LoopState, dict, list[int]] | None:
    """Load the training state a killed run of this configuration left in ``state_dir`` into the model, the
    optimizer, the method, the averager, the dev history and the best state; returns (loop state, this process's
    RNG states, the steps each session resumed from), or None when there is none."""
    state_dir = checkpoint.whole_state_dir(state_dir)
    saved = checkpoint.read_training_state(state_dir, cfg.run_id)
    if saved is None:
        accelerator.print(f"train.resume: no training state in {state_dir}; training from step 0")
        return None
    if saved["processes"] != accelerator.num_processes:
        raise PeftbenchError(f"{state_dir}: a training state of {saved['processes']} processes; resume it with as "
                             f"many (this launch has {accelerator.num_processes})")
    own = checkpoint.load_process_state(state_dir, accelerator.process_index)
    tensors = {**checkpoint.load_process_state(state_dir, 0), "rng": own["rng"]} if accelerator.process_index else own
    params = dict(raw_model.named_parameters())
    with torch.no_grad():
        for name, value in tensors["trained"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(tensors["optimizer"])
    if accelerator.scaler:  # fp16: the loss scale and its growth tracker
        accelerator.scaler.load_state_dict(tensors["scaler"])
    method.load_training_state(raw_model, tensors["method"])
    if averager:
        averager.load_state_dict(tensors["averager"])
    history.extend(saved["history"])
    if saved["best"] is not None:
        best.update(metrics=history[saved["best"]], state=tensors["best"])
    state = LoopState(**saved["loop"])
    accelerator.print(f"resuming {cfg.output_dir} at step {state.step} of {state.planned_steps}")
    return state, tensors["rng"], [*saved["resumed_from"], state.step]


def restoring_rng(loader, rng: dict):
    """``loader``'s batches, with this process's RNG states restored once its first batch is fetched: the
    iterator draws a seed from the global generator, which the interrupted run did at the start of the epoch."""
    batches = iter(loader)
    first = next(batches, None)
    checkpoint.set_rng_state(rng)
    if first is not None:
        yield first
        yield from batches
