"""The one training loop, used by every method.

Accelerate handles devices, processes, mixed precision and gradient
accumulation; the method handles what is trained. The loop: seed, data (under
``main_process_first``), model + method, AdamW with linear warm-up/decay,
``accumulate``, dev evaluation each epoch with ``gather_for_metrics``, the best
dev state kept, test evaluation of that state, checkpoint, record.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftbench import models
from peftbench.config import RunConfig
from peftbench.data import Collator, encode, eval_loader, train_loader
from peftbench.inference import META_FILE
from peftbench.measure import StepTimer, peak_memory_mb, reset_peak_memory, synchronize
from peftbench.methods import Method, RunContext, get_method, set_trainable
from peftbench.metrics import classification_metrics
from peftbench.records import RECORD_NAME, environment, make_record, write_atomic
from peftbench.tasks import load_task

CHECKPOINT_DIR = "checkpoint"


def default_output_dir(cfg: RunConfig) -> str:
    return f"runs/{cfg.task.name}-{cfg.method.name}-{cfg.run_id[:8]}"


@dataclass
class RunResult:
    record: dict
    model: torch.nn.Module  # the trained model (best dev state), unwrapped
    tokenizer: object


def run(cfg: RunConfig, provenance: dict | None = None) -> RunResult:
    """Train and evaluate one configuration; write its record. A crash writes a failed record.

    ``provenance`` (e.g. the sweep a run belongs to) is stored in the record as is.
    """
    provenance = {"provenance": provenance} if provenance else {}
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg)
    AcceleratorState._reset_state()  # several runs in one process may differ in precision
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps)
    out_dir = Path(cfg.output_dir)
    env = environment(accelerator.num_processes)
    start = time.perf_counter()
    try:
        result = _train(cfg, accelerator, out_dir)
    except Exception as exc:  # an interrupt (KeyboardInterrupt, SystemExit) leaves no record: the run is still to do
        if accelerator.is_main_process:
            error = f"{type(exc).__name__}: {exc}".strip()
            write_atomic(out_dir / RECORD_NAME, make_record("failed", cfg.to_dict(), cfg.run_id, env, error=error,
                                                            extra=provenance))
        raise
    model, tokenizer = result.pop("model"), result.pop("tokenizer")
    result["metrics"]["wall_s"] = time.perf_counter() - start
    record = make_record("success", cfg.to_dict(), cfg.run_id, env, result.pop("metrics"), result.pop("params"),
                         extra={**result, **provenance})
    if accelerator.is_main_process:
        write_atomic(out_dir / RECORD_NAME, record)
    accelerator.wait_for_everyone()
    # Not end_training(): it destroys the process group, which the next run of a sweep still needs.
    accelerator.free_memory()  # drop the accelerator's references (a sweep runs many cells in one process)
    return RunResult(record, model, tokenizer)


def _train(cfg: RunConfig, accelerator: Accelerator, out_dir: Path) -> dict:
    t = cfg.train
    with accelerator.main_process_first():
        task = load_task(cfg.task)
        train = task.splits["train"]
        tokenizer = models.load_tokenizer(cfg.model, list(train["text_a"]) + list(train["text_b"]))
        pair = any(train["text_b"])
        encoded = {split: encode(ds, tokenizer, cfg.task.max_length, pair) for split, ds in task.splits.items()}
    labels = list(task.spec.labels)

    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if accelerator.device.type == "cuda" else 1)
    train_dl = train_loader(encoded["train"], collator, t.batch_size, t.seed, t.group_by_length)
    train_sampler = train_dl.batch_sampler
    eval_dls = {split: eval_loader(encoded[split], collator, t.eval_batch_size)
                for split in ("dev", "test") if split == "dev" or task.labeled("test")}
    train_dl, *prepared = accelerator.prepare(train_dl, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, prepared))

    steps_per_epoch = math.ceil(len(train_dl) / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.epochs if t.max_steps <= 0 else min(t.max_steps, steps_per_epoch * t.epochs)
    epochs = math.ceil(total_steps / steps_per_epoch)

    set_seed(t.seed)  # before the model: init, dropout and method modules follow the seed
    model = models.load_model(cfg.model, labels, tokenizer)
    method: Method = get_method(cfg.method.name)(cfg.method)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if t.save_checkpoint and accelerator.is_main_process and cfg.model.name_or_path == models.TINY and not method.saves_full_model:
        model.save_pretrained(str(ckpt_dir / "base"))  # a random-init base cannot be rebuilt from a name
    model = method.apply(model, RunContext(total_steps=total_steps, num_labels=len(labels)))
    params = set_trainable(model, method)

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases, norms
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    device = accelerator.device
    timer = StepTimer(device, warmup_steps=min(t.timing_warmup_steps, total_steps // 2))
    reset_peak_memory(device)
    progress = tqdm(total=total_steps, desc=f"{cfg.task.name}/{cfg.method.name}", disable=not accelerator.is_local_main_process)
    history, best, best_state = [], None, None
    step, loss_sum, loss_count = 0, torch.zeros((), device=device), 0
    for epoch in range(epochs):
        model.train()
        train_sampler.set_epoch(epoch)
        for batch in train_dl:
            timer.count(len(batch["labels"]), batch.pop("num_tokens"))
            batch.pop("id")
            with accelerator.accumulate(model):
                loss = model(**batch).loss  # includes any regulariser the model adds (AdaLoRA's orthogonality term)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    method.on_optimizer_step(raw_model, step + 1)  # gradients are still there (AdaLoRA reads them)
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            if not optimizer.step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
                scheduler.step()
            step += 1
            timer.optimizer_step(step)
            progress.update(1)
            if step % t.log_every == 0 or step == total_steps:
                mean_loss = (loss_sum / loss_count).item()  # the only host sync in the step, every log_every steps
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}")
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                loss_sum.zero_()
                loss_count = 0
            if step >= total_steps:
                break
        timer.pause()
        dev = evaluate(model, eval_dls["dev"], accelerator)[0]
        history.append({"epoch": epoch + 1, "step": step, **dev})
        if best is None or dev["accuracy"] > best["accuracy"]:
            best = history[-1]
            best_state = {n: p.detach().to("cpu", copy=True) for n, p in raw_model.named_parameters() if p.requires_grad}
        timer.resume()
    progress.close()
    timing = timer.result()
    memory = peak_memory_mb(device)

    with torch.no_grad():
        for name, param in raw_model.named_parameters():
            if name in best_state:
                param.copy_(best_state[name])
    dev_metrics, _, _ = evaluate(model, eval_dls["dev"], accelerator)
    metrics = {**dev_metrics, "best_epoch": best["epoch"]}
    if "test" in eval_dls:
        test_metrics = evaluate(model, eval_dls["test"], accelerator)[0]
        metrics.update({f"test_{k}": v for k, v in test_metrics.items() if k != "eval_samples_per_s"})
    metrics.update(_throughput(timing, memory, accelerator))

    adapter_bytes = method.trained_bytes(raw_model)
    if t.save_checkpoint and accelerator.is_main_process:
        method.save(raw_model, ckpt_dir)
        tokenizer.save_pretrained(str(ckpt_dir))
        meta = {"method": cfg.method.name, "task": cfg.task.name, "labels": labels,
                "label_names": list(task.spec.label_names or labels), "pair": pair, "max_length": cfg.task.max_length,
                "base_model": None if method.saves_full_model else
                ("base" if cfg.model.name_or_path == models.TINY else cfg.model.name_or_path),
                "run_id": cfg.run_id, "config": cfg.to_dict()}
        (ckpt_dir / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        adapter_bytes = sum(f.stat().st_size for f in ckpt_dir.iterdir() if f.suffix in (".safetensors", ".bin"))

    return {
        "model": raw_model,
        "tokenizer": tokenizer,
        "metrics": metrics,
        "params": {**params, "adapter_bytes": adapter_bytes},
        "dev_history": history,
        "data": {"source": task.source, "dropped": task.dropped,
                 **{f"n_{split}": len(ds) for split, ds in task.splits.items()}},
        "method_summary": method.summary(raw_model),
        "backbone": {"name_or_path": cfg.model.name_or_path, "random_init": cfg.model.name_or_path == models.TINY},
        "checkpoint": str(ckpt_dir) if t.save_checkpoint else None,
        "total_steps": total_steps,
    }


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator):
    """Metrics over exactly the split (``gather_for_metrics`` drops the padding samples of the last batch).

    Returns (metrics, ids, predictions) in the loader's order.
    """
    model.eval()
    synchronize(accelerator.device)
    start = time.perf_counter()
    ids, preds, golds = [], [], []
    for batch in loader:
        batch.pop("num_tokens")
        batch_ids, labels = batch.pop("id"), batch.pop("labels")
        logits = model(**batch).logits
        batch_ids, batch_preds, labels = accelerator.gather_for_metrics((batch_ids, logits.argmax(-1), labels))
        ids.append(batch_ids.cpu())
        preds.append(batch_preds.cpu())
        golds.append(labels.cpu())
    seconds = time.perf_counter() - start
    model.train()
    ids, preds, golds = torch.cat(ids), torch.cat(preds), torch.cat(golds)
    metrics = classification_metrics(golds.tolist(), preds.tolist())
    metrics["eval_samples_per_s"] = len(golds) / seconds
    return metrics, ids, preds


def _throughput(timing: dict, memory: dict, accelerator: Accelerator) -> dict:
    """Train throughput summed over processes (slowest process's time); peak memory per process and max."""
    counts = torch.tensor([timing["timed_samples"], timing["timed_tokens"], timing["timed_steps"]],
                          dtype=torch.float64, device=accelerator.device)
    seconds = torch.tensor([timing["timed_seconds"]], dtype=torch.float64, device=accelerator.device)
    peaks = accelerator.gather(torch.tensor([memory["peak_memory_mb"]], dtype=torch.float64, device=accelerator.device))
    counts = accelerator.reduce(counts, "sum")
    seconds = accelerator.reduce(seconds, "max").item()
    samples, tokens, _ = counts.tolist()
    return {
        "train_samples_per_s": samples / seconds if seconds else float("nan"),
        "train_tokens_per_s": tokens / seconds if seconds else float("nan"),
        "timed_steps": timing["timed_steps"],
        "timed_seconds": seconds,
        "peak_memory_mb": max(peaks.tolist()),
        "peak_memory_mb_per_process": peaks.tolist(),
        "memory_kind": memory["memory_kind"],
        **({"peak_memory_reserved_mb": memory["peak_memory_reserved_mb"]} if "peak_memory_reserved_mb" in memory else {}),
    }
