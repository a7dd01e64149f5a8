"""The one training loop. Fine-tuning (every method) and masked-LM pretraining both run :func:`fit`.

Accelerate handles devices, processes, mixed precision and gradient accumulation;
the recipe hands in the prepared model, optimizer and batches, and the loop
accumulates, clips, steps, schedules the learning rate, logs the loss (one host
sync every ``log_every`` steps, reduced over processes), times the steps and
calls the recipe's hooks: ``on_optimizer_step`` (a method's per-step update),
``on_eval`` and ``on_save``. A micro-batch's loss comes from the tricks' objective
(the model's own loss unless label smoothing or R-Drop is on), and an adversary's
losses are back-propagated after it. This is the only place in the package that
calls ``backward``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast
from tqdm.auto import tqdm

from peftbench.config import LoopConfig
from peftbench.distributed import local
from peftbench.errors import DivergedError, PeftbenchError
from peftbench.heartbeat import new_phase, start_beating
from peftbench.measure import StepTimer, peak_memory_mb, reset_peak_memory
from peftbench.tricks import LoopTricks

TRACKING_PROJECT = "peftbench"  # the MLflow experiment; TensorBoard events go to <trackers dir>/peftbench/


def process_state(dist_timeout: int = LoopConfig.dist_timeout):
    """This process's place among the launched ones, as the accelerator sees it (on CPU, ``cpu=True`` is what
    joins processes started by torchrun into one gloo group). The first call decides for the whole process,
    ``dist_timeout`` too: the seconds a collective waits for the other processes before it fails. The main
    process of several beats for the others to follow while it works alone (:mod:`peftbench.heartbeat`)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=dist_timeout))
    start_beating(state, dist_timeout)
    return state


def make_accelerator(cfg: LoopConfig, compile: bool = False, trackers_dir: Path | None = None) -> Accelerator:
    """A fresh Accelerator for one run (several runs in one process may differ in precision); with
    ``cfg.report_to``, its experiment trackers write under ``trackers_dir``. On CPU, denormal floats are
    flushed to zero for the process."""
    AcceleratorState._reset_state()
    new_phase(process_state(cfg.dist_timeout))  # the group outlives the reset: its first run sets the timeout
    cuda = torch.cuda.is_available()
    if not cuda:  # denormal floats (tiny prefixes, small gradients) run many times slower on CPUs; GPUs flush them
        torch.set_flush_denormal(True)
    if cfg.mixed_precision == "fp16" and not cuda:
        raise PeftbenchError("train.mixed_precision=fp16 needs a GPU: on CPU Accelerate runs neither fp16 autocast "
                             "nor loss scaling; use bf16 or 'no'")
    tracking = {}
    if cfg.report_to:
        where = ProjectConfiguration(project_dir=str(trackers_dir), logging_dir=str(trackers_dir))
        tracking = {"log_with": list(cfg.report_to), "project_config": where}
    return Accelerator(cpu=not cuda, mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.grad_accum_steps,
                       dataloader_config=DataLoaderConfiguration(non_blocking=cuda),  # with pinned batches
                       dynamo_backend="inductor" if compile else "no", **tracking)


def start_tracking(accelerator: Accelerator, run_id: str, config: dict, results_dir: Path) -> None:
    """Open the run in every tracker of ``train.report_to``: the resolved config as hyper-parameters, the run id
    as the run's name. MLflow keeps its runs in ``results_dir/mlflow.db`` (SQLite) unless MLFLOW_TRACKING_URI
    names another store (any SQLAlchemy URL or server)."""
    used = {getattr(t, "value", t) for t in accelerator.log_with}  # LoggerType members or names
    if not used:
        return
    if "mlflow" in used and "MLFLOW_TRACKING_URI" not in os.environ and accelerator.is_main_process:
        import mlflow

        results_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(f"sqlite:///{results_dir.resolve() / 'mlflow.db'}")
    names = {"mlflow": {"run_name": run_id}, "wandb": {"name": run_id}, "trackio": {"name": run_id}}
    accelerator.init_trackers(TRACKING_PROJECT, config=_flat(config),
                              init_kwargs={k: v for k, v in names.items() if k in used})


def stop_tracking(accelerator: Accelerator) -> None:
    """Flush and close the trackers (not ``end_training``: it also ends the process group a sweep still needs)."""
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            tracker.finish()


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; values trackers cannot store as numbers become text."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def build_optimizer(model: torch.nn.Module, cfg: LoopConfig,
                    lr_scale: Callable[[str], float] = lambda name: 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (tensors of < 2 dims).
    ``lr_scale(name)`` multiplies a parameter's learning rate (a method's per-group rates: LoRA+'s B); each
    group keeps its ``lr_scale``, which the loop applies to the schedule's rate. Fused (one kernel for all
    tensors) on GPU."""
    groups: dict[tuple[bool, float], list] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, float(lr_scale(name))), []).append(p)
    return torch.optim.AdamW([{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                               "lr_scale": scale} for (decay, scale), params in groups.items()],
                             lr=cfg.lr, fused=torch.cuda.is_available())


def set_rates(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate ``lr`` for this step, times each group's ``lr_scale`` (see ``build_optimizer``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


POLYNOMIAL_END = 1e-7  # the polynomial schedule's last rate (transformers' lr_end)


def lr_factor(step: int, planned: int, cfg: LoopConfig) -> float:
    """Learning-rate factor at ``step`` of ``planned`` (the end may be re-planned): linear warm-up over
    ``warmup_ratio`` of the steps, then ``cfg.scheduler``'s decay, each as transformers' ``get_scheduler``
    computes it (linear to 0, half a cosine, cosine with hard restarts, polynomial to 1e-7, constant,
    inverse square root with the warm-up as timescale)."""
    warmup = int(cfg.warmup_ratio * planned)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, planned - warmup))
    if cfg.scheduler == "linear":
        return max(0.0, float(planned - step) / float(max(1, planned - warmup)))
    if cfg.scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if cfg.scheduler == "cosine_with_restarts":
        return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * (cfg.scheduler_cycles * progress
                                                                                       % 1.0))))
    if cfg.scheduler == "polynomial":
        end = POLYNOMIAL_END / cfg.lr
        return end if step > planned else (1.0 - end) * (1.0 - progress) ** cfg.scheduler_power + end
    if cfg.scheduler == "constant":
        return 1.0
    timescale = warmup or 10_000  # inverse_sqrt
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


@dataclass
class LoopState:
    """Where a run stands; saved with a resumable checkpoint and restored from it."""

    planned_steps: int  # the optimizer steps the run will take (a time budget re-plans it)
    step: int = 0  # optimizer steps taken
    lr_steps: int = 0  # steps the schedule has advanced (fp16 loss scaling skips steps with inf gradients)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    train_seconds: float = 0.0  # wall time in the loop, evaluation included, over every session
    loss_curve: list = field(default_factory=list)  # [{"step", "loss"}] at every log point and evaluation
    lr: float = 0.0  # the learning rate of the last step
    samples: int = 0  # training samples this process has consumed

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Hooks:
    on_optimizer_step: Callable[[int], None] = lambda step: None  # after each optimizer step, gradients still there
    on_eval: Callable[[LoopState], None] = lambda state: None
    on_save: Callable[[LoopState], None] = lambda state: None


def fit(accelerator: Accelerator, model, optimizer, batches: Callable[[int, int], Iterable[dict]], cfg: LoopConfig,
        state: LoopState, hooks: Hooks, clip: list[torch.nn.Parameter], *, eval_every: int = 0, save_every: int = 0,
        max_minutes: float = 0.0, desc: str = "train", tricks: LoopTricks = LoopTricks()) -> dict:
    """Train until ``state.planned_steps``; returns the throughput summary of the timed steps.

    ``batches(epoch, skip)`` yields the micro-batches of an epoch after the first ``skip``, each
    ``{"inputs": model inputs, "labels", "num_tokens"}``. ``on_eval`` runs every ``eval_every`` steps
    and at the end, or with ``eval_every=0`` after every epoch and at the end; ``on_save`` every
    ``save_every`` steps before the end. Evaluation and saving are left out of the timed steps.
    With ``max_minutes`` the planned end moves so that training stops near that time.
    """
    device = accelerator.device
    timer = StepTimer(device, warmup_steps=min(cfg.timing_warmup_steps, (state.planned_steps - state.step) // 2))
    reset_peak_memory(device)
    progress = tqdm(total=state.planned_steps, initial=state.step, desc=desc,
                    disable=not accelerator.is_local_main_process)
    log_every = min(cfg.log_every, max(1, state.planned_steps // 20))  # a short run logs too
    loss_sum, loss_count, session_steps = torch.zeros((), device=device), 0, 0
    grad_norm = None  # the last step's, for trackers
    session_start = time.perf_counter()

    def log_loss():
        """The mean loss since the last log point, over every process: the only host sync of a step."""
        nonlocal loss_count
        if loss_count == 0:
            return
        mean = accelerator.reduce(loss_sum / loss_count, "mean").item()
        if not math.isfinite(mean):
            raise DivergedError(f"diverged: loss is {mean} at step {state.step}")
        state.loss_curve.append({"step": state.step, "loss": mean})
        progress.set_postfix(loss=f"{mean:.4f}")
        if accelerator.log_with:
            values = {"train/loss": mean, "train/lr": state.lr}
            if grad_norm is not None:
                values["train/grad_norm"] = float(local(grad_norm))  # replicated where sharded
            accelerator.log(values, step=state.step)
        loss_sum.zero_()
        loss_count = 0

    def paused(hook):
        nonlocal session_start
        timer.pause()
        log_loss()
        check_finite(clip, model, state.step)  # before evaluating or saving what the last steps made
        now = time.perf_counter()
        state.train_seconds += now - session_start
        session_start = now
        hook(state)
        timer.resume()

    try:
        while state.step < state.planned_steps:
            model.train()
            started_at = state.batch_in_epoch
            for batch in batches(state.epoch, state.batch_in_epoch):
                state.batch_in_epoch += 1
                state.samples += len(batch["labels"])
                timer.count(len(batch["labels"]), batch["num_tokens"])
                with accelerator.accumulate(model):
                    state.lr = cfg.lr * lr_factor(state.lr_steps, state.planned_steps, cfg)
                    set_rates(optimizer, state.lr)
                    loss = tricks.objective(model, batch)
                    accelerator.backward(loss)
                    for adversarial in tricks.adversarial_losses(model, batch):
                        accelerator.backward(adversarial)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(clip, cfg.max_grad_norm)  # before clipping
                    optimizer.step()
                    if accelerator.sync_gradients:
                        hooks.on_optimizer_step(state.step + 1)
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                if not accelerator.sync_gradients:
                    continue
                state.lr_steps += not optimizer.step_was_skipped
                state.step += 1
                session_steps += 1
                timer.optimizer_step(session_steps)
                progress.update(1)
                if state.step % log_every == 0 or state.step >= state.planned_steps:
                    log_loss()
                    if max_minutes > 0:
                        elapsed = state.train_seconds + time.perf_counter() - session_start
                        fitting = int(state.step * max_minutes * 60 / elapsed)  # steps that fit the budget
                        planned = min(state.planned_steps, max(state.step, fitting))
                        state.planned_steps = int(broadcast(torch.tensor([planned], device=device)).item())
                if eval_every and (state.step % eval_every == 0 or state.step >= state.planned_steps):
                    paused(hooks.on_eval)
                if save_every and state.step % save_every == 0 and state.step < state.planned_steps:
                    paused(hooks.on_save)
                if state.step >= state.planned_steps:
                    break
            else:  # the epoch ran out before the budget
                if started_at == state.batch_in_epoch == 0:  # a whole epoch without a batch: no step would come
                    raise PeftbenchError("the training data yields no batch (fewer examples than processes?)")
                state.epoch += 1
                state.batch_in_epoch = 0
                if not eval_every:
                    paused(hooks.on_eval)
                continue
            if not eval_every:  # the budget ended inside this epoch
                paused(hooks.on_eval)
    finally:
        progress.close()  # also on an error: the error line starts a line of its own
    check_finite(clip, model, state.step)
    state.train_seconds += time.perf_counter() - session_start
    return throughput_summary(timer.result(), peak_memory_mb(device), accelerator)


def release(accelerator: Accelerator) -> None:
    """After a run: hand the device's cached memory back for the next run in this process. Not
    ``end_training()``, which destroys the process group a sweep's next cell still needs. On CPU there is no
    cache, and ``free_memory``'s full garbage collection would only cost time (the references go with the
    accelerator)."""
    if accelerator.device.type != "cpu":
        accelerator.free_memory()


def check_finite(params: list[torch.nn.Parameter], model: torch.nn.Module, step: int) -> None:
    """Raise ``DivergedError`` naming the first trained parameter that holds a NaN or an infinity (one host
    sync for all of them: the loss check alone misses an update that breaks the weights after the last loss).
    Sharded parameters are checked shard by shard and the verdict agreed by every process."""
    if not params:
        return
    finite = torch.stack([local(p).detach().isfinite().all() for p in params]).all()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        finite = finite.to(torch.int32)
        torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN)
    if bool(finite):
        return
    names = {id(p): n for n, p in model.named_parameters()}
    bad = next((p for p in params if not local(p).detach().isfinite().all()), None)
    where = f"'{names.get(id(bad), '?')}'" if bad is not None else "(in another process's shard)"
    raise DivergedError(f"diverged: trained parameter {where} is not finite after step {step}")


def throughput_summary(timing: dict, memory: dict, accelerator: Accelerator) -> dict:
    """Train throughput summed over processes over the slowest process's time; peak memory per process and max.
    On a CPU, ``train_cpu_share``: the least over processes of CPU seconds / (wall seconds x threads) in the timed
    steps, near 1 when each process had its cores, lower when it shared them or was paused."""
    device = accelerator.device
    counts = torch.tensor([timing["timed_samples"], timing["timed_tokens"]], dtype=torch.float64, device=device)
    seconds = torch.tensor([timing["timed_seconds"]], dtype=torch.float64, device=device)
    share = {}
    if device.type == "cpu":  # on a GPU the host's CPU time says nothing about the run's speed: no collective
        own = timing["timed_cpu_seconds"] / (timing["timed_seconds"] * torch.get_num_threads()) \
            if timing["timed_seconds"] else float("nan")
        share["train_cpu_share"] = -accelerator.reduce(torch.tensor([-own], dtype=torch.float64), "max").item()  # min
    peaks = accelerator.gather(torch.tensor([memory["peak_memory_mb"]], dtype=torch.float64, device=device))
    samples, tokens = accelerator.reduce(counts, "sum").tolist()
    seconds = accelerator.reduce(seconds, "max").item()
    return {
        **share,
        "train_samples_per_s": samples / seconds if seconds else float("nan"),
        "train_tokens_per_s": tokens / seconds if seconds else float("nan"),
        "timed_steps": timing["timed_steps"],
        "timed_seconds": seconds,
        "peak_memory_mb": max(peaks.tolist()),
        "peak_memory_mb_per_process": peaks.tolist(),
        "memory_kind": memory["memory_kind"],
        **{k: v for k, v in memory.items() if k == "peak_memory_reserved_mb"},
    }
