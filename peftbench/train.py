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
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from peftbench import models
from peftbench.config import RunConfig
from peftbench.data import Collator, encode, encode_tokens, eval_loader, train_loader
from peftbench.errors import PeftbenchError
from peftbench.inference import META_FILE
from peftbench.measure import StepTimer, peak_memory_mb, reset_peak_memory, synchronize
from peftbench.methods import Method, RunContext, get_method, set_trainable
from peftbench.metrics import classification_metrics, entity_metrics
from peftbench.pretrain import pretrained_by_peftbench
from peftbench.records import RECORD_NAME, environment, make_record, write_atomic
from peftbench.tasks import TaskData, load_task
from peftbench.tasks.ner import Span, predicted_spans

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
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps,
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda),  # with pinned batches
                              dynamo_backend="inductor" if cfg.train.compile else "no")
    check_launch(cfg, accelerator)  # refuse what this launch cannot run, before any work
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
        tokens = task.spec.kind == "token_classification"
        encoded = {split: encode_tokens(ds, tokenizer, cfg.task.max_length, task.spec.labels, cfg.task.tag_scheme)
                   if tokens else encode(ds, tokenizer, cfg.task.max_length, pair) for split, ds in task.splits.items()}
    labels = list(task.spec.labels)

    cuda = accelerator.device.type == "cuda"
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else 1)
    train_dl = train_loader(encoded["train"], collator, t.batch_size, t.seed, t.group_by_length, pin_memory=cuda)
    train_sampler = train_dl.batch_sampler
    eval_dls = {split: eval_loader(encoded[split], collator, t.eval_batch_size, pin_memory=cuda)
                for split in ("dev", "test") if split == "dev" or task.labeled("test")}
    train_dl, *prepared = accelerator.prepare(train_dl, *eval_dls.values())
    eval_dls = dict(zip(eval_dls, prepared))

    steps_per_epoch = math.ceil(len(train_dl) / t.grad_accum_steps)
    total_steps = steps_per_epoch * t.epochs if t.max_steps <= 0 else min(t.max_steps, steps_per_epoch * t.epochs)
    epochs = math.ceil(total_steps / steps_per_epoch)

    set_seed(t.seed)  # before the model: init, dropout and method modules follow the seed
    method: Method = get_method(cfg.method.name)(cfg.method)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    save_base = t.save_checkpoint and accelerator.is_main_process and not method.saves_full_model
    quantized = cfg.model.quantization != "none"
    model = models.load_model(cfg.model, labels, tokenizer, task.spec.kind,
                              save_random_base=ckpt_dir / "base" if save_base else None,
                              device_map={"": accelerator.local_process_index} if quantized and cuda else None)
    base_params = {id(p) for p in model.parameters()}
    if t.gradient_checkpointing:  # non-reentrant: works when the inputs need no gradient (frozen embeddings)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, RunContext(total_steps=total_steps, num_labels=len(labels), task_kind=task.spec.kind))
    params = set_trainable(model, method)
    params.update(frozen_weights_to_compute_dtype(model, t.mixed_precision))
    params["base_weight_bytes"] = sum(models.stored_bytes(p) for p in unique_parameters(model) if id(p) in base_params)

    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # no decay on biases, norms
    optimizer = torch.optim.AdamW(groups, lr=t.lr, fused=cuda)  # fused: one kernel for all tensors
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces the parameters it shards

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
            batch.pop("char_index", None)
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
        dev = evaluate(model, eval_dls["dev"], accelerator, task, "dev")[0]
        history.append({"epoch": epoch + 1, "step": step, **dev})
        if best is None or dev["score"] > best["score"]:
            best = history[-1]
            best_state = {n: _local(p).detach().to("cpu", copy=True)  # each process keeps its own shard
                          for n, p in raw_model.named_parameters() if p.requires_grad}
        timer.resume()
    progress.close()
    timing = timer.result()
    memory = peak_memory_mb(device)

    with torch.no_grad():
        for name, param in raw_model.named_parameters():
            if name in best_state:
                _local(param).copy_(best_state[name])
    dev_metrics, _, _ = evaluate(model, eval_dls["dev"], accelerator, task, "dev")
    metrics = {**dev_metrics, "best_epoch": best["epoch"]}
    if "test" in eval_dls:
        test_metrics = evaluate(model, eval_dls["test"], accelerator, task, "test")[0]
        metrics.update({f"test_{k}": v for k, v in test_metrics.items() if k not in ("eval_samples_per_s", "score_name")})
    metrics.update(_throughput(timing, memory, accelerator))

    adapter_bytes = method.trained_bytes(raw_model)
    fsdp = accelerator.distributed_type == DistributedType.FSDP  # only full fine-tuning gets here (check_launch)
    full_state = accelerator.get_state_dict(model) if t.save_checkpoint and fsdp else None  # every process gathers
    if t.save_checkpoint and accelerator.is_main_process:
        if fsdp:
            raw_model.save_pretrained(str(ckpt_dir), state_dict=full_state)
        else:
            method.save(raw_model, ckpt_dir)
        tokenizer.save_pretrained(str(ckpt_dir))
        meta = {"method": cfg.method.name, "task": cfg.task.name, "kind": task.spec.kind, "labels": labels,
                "label_names": list(task.spec.label_names or labels), "pair": pair, "max_length": cfg.task.max_length,
                "base_model": None if method.saves_full_model else
                ("base" if models.is_random_init(cfg.model.name_or_path) else cfg.model.name_or_path),
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
                 **({"overlapping_entities": task.overlapping_entities} if tokens else {}),
                 **{f"n_{split}": len(ds) for split, ds in task.splits.items()}},
        "method_summary": method.summary(raw_model),
        "precision": {"mixed_precision": t.mixed_precision, "quantization": models.quantization_name(cfg.model),
                      "base_weight_bytes": params["base_weight_bytes"]},
        "backbone": {"name_or_path": cfg.model.name_or_path, "random_init": models.is_random_init(cfg.model.name_or_path),
                     "pretrained_by_peftbench": pretrained_by_peftbench(cfg.model.name_or_path)},
        "checkpoint": str(ckpt_dir) if t.save_checkpoint else None,
        "total_steps": total_steps,
    }


def check_launch(cfg: RunConfig, accelerator: Accelerator) -> None:
    """Refuse at start-up what this device or sharding strategy cannot run (a clear error, not a failure mid-run)."""
    if cfg.train.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise PeftbenchError("train.mixed_precision=fp16 needs a GPU: on CPU Accelerate runs neither fp16 autocast "
                             "nor loss scaling; use bf16 or 'no'")
    kind = accelerator.distributed_type
    if kind not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    strategy, name = ("FSDP" if kind == DistributedType.FSDP else "DeepSpeed"), cfg.method.name
    ddp = "launch it with recipes/accelerate/multi_gpu.yaml (DDP)"
    if cfg.model.quantization != "none":
        raise PeftbenchError(f"model.quantization={cfg.model.quantization} cannot run under {strategy}: bitsandbytes "
                             f"weights are neither sharded nor partitioned by it; {ddp}, one quantised copy per GPU")
    if kind == DistributedType.FSDP and not get_method(name).trains_base_weights:
        raise PeftbenchError(f"method '{name}' cannot run under FSDP: peftbench keeps and saves its trained tensors "
                             f"whole, which FSDP shards, and a method that trains a small part of the weights needs "
                             f"no sharding; {ddp} or recipes/accelerate/deepspeed_zero2.yaml")
    if kind == DistributedType.DEEPSPEED:
        if get_method(name).reads_gradients:
            raise PeftbenchError(f"method '{name}' cannot run under DeepSpeed ZeRO: it reads whole gradients after "
                                 f"the backward pass, and ZeRO-2 partitions them across processes; {ddp}")
        ds = accelerator.state.deepspeed_plugin
        accum = ds.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if accum != "auto" and accum != cfg.train.grad_accum_steps:
            raise PeftbenchError(f"DeepSpeed config has gradient_accumulation_steps={accum} but train.grad_accum_steps="
                                 f"{cfg.train.grad_accum_steps}: set them equal (DeepSpeed's value would win)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size  # the model is prepared alone


def _local(param: torch.Tensor) -> torch.Tensor:
    """A parameter's data on this process: its shard under FSDP2 (a DTensor), else the parameter itself."""
    return param.to_local() if hasattr(param, "to_local") else param


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator, task: TaskData, split: str):
    """Metrics over exactly the split (``gather_for_metrics`` drops the padding samples of the last batch),
    with ``score``, the task's headline metric (accuracy; entity F1 for token classification).

    Returns (metrics, ids, predictions) in the loader's order: class indices, or span lists.
    """
    model.eval()
    synchronize(accelerator.device)
    start = time.perf_counter()
    rows = []
    for batch in loader:
        batch.pop("num_tokens")
        batch_ids, labels, index = batch.pop("id"), batch.pop("labels"), batch.pop("char_index", None)
        logits = model(**batch).logits
        if index is None:
            rows.append(accelerator.gather_for_metrics((batch_ids, logits.argmax(-1), labels)))
            continue
        preds = logits[:, -labels.shape[1]:].argmax(-1)  # methods that prepend virtual tokens return longer outputs
        preds, labels, index = (accelerator.pad_across_processes(t, dim=1, pad_index=-100) for t in (preds, labels, index))
        rows.append(accelerator.gather_for_metrics((batch_ids, preds, labels, index)))
    seconds = time.perf_counter() - start
    model.train()
    ids = torch.cat([r[0].cpu() for r in rows])
    if task.spec.kind == "classification":
        preds, golds = torch.cat([r[1].cpu() for r in rows]), torch.cat([r[2].cpu() for r in rows])
        metrics = classification_metrics(golds.tolist(), preds.tolist())
    else:
        preds, metrics = _entity_scores(rows, ids, task, split)
    metrics.update(score=metrics[task.spec.metric], score_name=task.spec.metric)
    metrics["eval_samples_per_s"] = len(ids) / seconds
    return metrics, ids, preds


def _entity_scores(rows, ids, task: TaskData, split: str) -> tuple[list[list[Span]], dict]:
    ds = task.splits[split]
    gold = {i: (len(text), [Span(e["start"], e["end"], e["type"]) for e in ents])
            for i, text, ents in zip(ds["id"], ds["text_a"], ds["entities"])}
    pred_rows, index_rows, correct, counted = [], [], 0, 0
    for _, preds, labels, index in rows:
        preds, labels, index = preds.cpu(), labels.cpu(), index.cpu()
        real = labels != -100
        correct += int((preds[real] == labels[real]).sum())
        counted += int(real.sum())
        pred_rows += preds.tolist()
        index_rows += index.tolist()
    pred_spans = [predicted_spans(p, c, gold[i][0], task.spec.labels)
                  for i, p, c in zip(ids.tolist(), pred_rows, index_rows)]
    metrics = entity_metrics([gold[i][1] for i in ids.tolist()], pred_spans, task.spec.entity_types)
    metrics["token_accuracy"] = correct / max(counted, 1)
    return pred_spans, metrics


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_weights_to_compute_dtype(model: torch.nn.Module, mixed_precision: str) -> dict:
    """Under mixed precision, keep frozen floating-point weights in the compute dtype.

    Autocast would cast them on every forward anyway; stored in bf16/fp16 they take half
    the memory and skip those casts. Trained parameters stay fp32 (the optimizer's master
    copy), and so do frozen ones that share a module with a trained one (BitFit's layer-norm
    weight beside its trained bias: ``layer_norm`` wants one dtype), and normalisation layers
    (a few KB; on CPU ``layer_norm`` refuses fp32 activations with bf16 weights, and
    bitsandbytes layers may return fp32). Returns the bytes of the frozen and the trained weights.
    """
    dtype = COMPUTE_DTYPES.get(mixed_precision)
    if dtype is not None:
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own) and "norm" not in type(module).__name__.lower():
                for p in own:
                    if p.is_floating_point():
                        p.data = p.data.to(dtype)
    frozen = trained = 0
    for p in unique_parameters(model):
        if p.requires_grad:
            trained += models.stored_bytes(p)
        else:
            frozen += models.stored_bytes(p)
    return {"frozen_weight_bytes": frozen, "trained_weight_bytes": trained}


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


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
