"""Everything of a run but its record: data, model, optimizer, the loop with its hooks (evaluation each epoch,
the best dev state kept, the resumable state saved), test evaluation of the best state, checkpoint, serving cost."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from peftbench import checkpoint, distributed, models, tricks
from peftbench.config import RunConfig, require
from peftbench.errors import DivergedError
from peftbench.inference import serving_cost
from peftbench.loop import Hooks, LoopState, build_optimizer, fit
from peftbench.records import RunPhase
from peftbench.train.evaluation import evaluate
from peftbench.train.resume import restoring_rng, resume
from peftbench.train.saving import save
from peftbench.train.setup import backbone_identity, hub_read, load_teacher, setup_data, setup_model


def fine_tune(cfg: RunConfig, accelerator: Accelerator, launch: distributed.Launch, work_dir: Path, out_dir: Path,
               phase: RunPhase, identity: dict) -> tuple[torch.nn.Module, object, dict]:
    """Everything of a run but its record; files go to ``work_dir``, which will become ``out_dir``. ``phase``
    learns when training begins (bad input found before leaves no record); ``identity`` (what a failed record
    holds too) gets the data's and the backbone's identity as soon as they are loaded."""
    t = cfg.train
    data = setup_data(cfg, accelerator)
    identity["data"] = {"task_version": data.task.spec.version, "fingerprints": data.task.fingerprints,
                        "hub": hub_read(cfg, data.task.spec)}
    steps_per_epoch = math.ceil(len(data.train) / t.grad_accum_steps)
    total_steps = t.max_steps if t.max_steps > 0 else steps_per_epoch * t.epochs  # as HF Trainer: max_steps wins
    epochs = math.ceil(total_steps / steps_per_epoch)
    require(t.early_stopping_patience < epochs, "train.early_stopping_patience",
            f"< {epochs}, the run's evaluations (one per epoch): it could never stop the run",
            t.early_stopping_patience)
    ckpt_dir = work_dir / checkpoint.CHECKPOINT_DIR
    model, method, params, base = setup_model(cfg, accelerator, data, total_steps, ckpt_dir, launch)
    identity["backbone"] = backbone_identity(cfg, models.without_peft(model).config)
    lr_scale = method.lr_scale
    if t.layer_decay < 1:
        layer_scale = tricks.layer_scales(model, t.layer_decay)
        lr_scale = lambda name: method.lr_scale(name) * layer_scale(name)  # noqa: E731
    optimizer = build_optimizer(model, t, lr_scale)
    model, optimizer = distributed.prepare(accelerator, launch, model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP replaces the parameters it shards
    teacher, identity["teacher"] = load_teacher(cfg, data, accelerator.device) if t.distill.teacher else (None, None)
    loop_tricks = tricks.loop_tricks(t, models.without_peft(raw_model), trainable, teacher)
    averager = tricks.averager(t, {n: distributed.local(p) for n, p in distributed.reshard(raw_model).named_parameters()
                                   if p.requires_grad})
    task = data.task

    history, best = [], {}

    def on_eval(state: LoopState) -> None:
        if averager:  # evaluate, keep as the best and save the averaged weights
            averager.on_eval()
            averager.swap()
        try:
            dev, ids, preds = evaluate(model, data.evals["dev"], accelerator, task, "dev")
        except DivergedError as exc:
            raise DivergedError(f"{exc} after step {state.step}") from None
        history.append({"epoch": state.epoch + (state.batch_in_epoch > 0), "step": state.step, **dev})
        accelerator.log({f"dev/{k}": v for k, v in dev.items() if isinstance(v, (int, float))}, step=state.step)
        if accelerator.is_main_process:
            loss = state.loss_curve[-1]["loss"] if state.loss_curve else float("nan")
            rate = state.samples * accelerator.num_processes / max(state.train_seconds, 1e-9)
            tqdm.write(f"{cfg.task.name}/{cfg.method.name} epoch {history[-1]['epoch']}/{epochs} step {state.step}: "
                       f"dev {dev['score_name']} {dev['score']:.4f}, loss {loss:.4f}, lr {state.lr:.2e}, "
                       f"{rate:.0f} samples/s, {state.train_seconds:.1f} s")
        shards = distributed.reshard(raw_model).named_parameters()  # each process its shard, also after evaluation
        if not best or dev["score"] > best["metrics"]["score"]:
            best.update(metrics=history[-1], state={n: distributed.local(p).detach().to("cpu", copy=True)
                                                    for n, p in shards if p.requires_grad},
                        per_example=task.spec.kind.per_example(ids, preds, task.splits["dev"]))
        if averager:
            averager.swap()
        if tricks.should_stop(len(history), history.index(best["metrics"]), t.early_stopping_patience):
            state.planned_steps = state.step

    state_dir = checkpoint.training_state_dir(out_dir)
    state, rng, resumed_from = LoopState(planned_steps=total_steps), None, []
    if t.resume:
        state, rng, resumed_from = (resume(cfg, accelerator, raw_model, optimizer, method, averager, state_dir,
                                            history, best) or (state, rng, resumed_from))

    def batches(epoch: int, skip: int):
        nonlocal rng
        loader = accelerator.skip_first_batches(data.train, skip) if skip else data.train
        loader.set_epoch(epoch)  # an Accelerate loader sets its sampler's epoch from its own count of passes
        data.sampler.set_epoch(epoch)  # (several processes: the shard inside it does not)
        if rng is None:
            return loader
        restore, rng = rng, None
        return restoring_rng(loader, restore)

    def save_state(s: LoopState) -> None:
        shared = {}  # the same on every process (DDP): written once, by the main process; each its own RNG
        if accelerator.is_main_process:
            shared = {"trained": {n: p.detach().cpu() for n, p in raw_model.named_parameters() if p.requires_grad},
                      "optimizer": optimizer.state_dict(), "best": best.get("state"),
                      "method": method.training_state(raw_model),
                      "averager": averager.state_dict() if averager else None,
                      "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None}
        checkpoint.save_process_states(
            accelerator, {"loop": s.to_dict(), "history": history, "best": history.index(best["metrics"]) if best
                          else None, "resumed_from": resumed_from}, shared, cfg.run_id, state_dir)

    def on_optimizer_step(step: int) -> None:
        method.on_optimizer_step(raw_model, step)
        if averager:
            averager.on_optimizer_step()

    hooks = Hooks(on_optimizer_step=on_optimizer_step, on_eval=on_eval, on_save=save_state)
    phase.training = True
    throughput = fit(accelerator, model, optimizer, batches, t, state, hooks, trainable, save_every=t.save_state_every,
                     desc=f"{cfg.task.name}/{cfg.method.name}", tricks=loop_tricks)
    if averager:  # the weights the last evaluation saw
        averager.swap()

    kind = task.spec.kind
    if best["metrics"] is history[-1] and "per_example" in best:  # training ended in its best state: it stands
        metrics = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")}
        per_example = {"dev": best["per_example"]}
    else:
        with torch.no_grad():
            for name, param in distributed.reshard(raw_model).named_parameters():
                if name in best["state"]:
                    distributed.local(param).copy_(best["state"][name])
        metrics, ids, preds = evaluate(model, data.evals["dev"], accelerator, task, "dev")
        per_example = {"dev": kind.per_example(ids, preds, task.splits["dev"])}
    metrics["best_epoch"] = best["metrics"]["epoch"]
    if "test" in data.evals:
        test, ids, preds = evaluate(model, data.evals["test"], accelerator, task, "test")
        metrics.update({f"test_{k}": v for k, v in test.items() if k not in ("eval_samples_per_s", "score_name")})
        per_example["test"] = kind.per_example(ids, preds, task.splits["test"])
    metrics.update(throughput)
    metrics["stopped_by"] = ("early_stopping" if state.step < total_steps else "max_steps" if t.max_steps > 0
                             else "epochs")
    held = accelerator.gather(torch.tensor([list(distributed.held_bytes(raw_model, optimizer).values())],
                                           dtype=torch.float64, device=accelerator.device))
    params["held_bytes_per_process"] = dict(zip(("weights", "gradients", "optimizer"),
                                                (list(map(int, column)) for column in held.T.tolist())))

    adapter_bytes = save(cfg, accelerator, launch, model, data, method, base, ckpt_dir,
                         {"metrics": metrics, "params": params})
    sharded = launch.sharded  # a sharded model runs only with all its processes
    split = "test" if "test" in data.evals else "dev"  # serving cost on the split evaluated last
    inference = (serving_cost(raw_model, method, split, data.encoded[split], data.collator, task.spec.kind.auto_class,
                              t.eval_batch_size, cfg.model.quantization != "none", accelerator)
                 if t.measure_inference and not sharded and accelerator.is_main_process else None)
    result = {
        "metrics": metrics,
        "params": {**params, "adapter_bytes": adapter_bytes},
        "dev_history": history,
        "loss_curve": state.loss_curve,
        "data": {"source": task.source, **identity["data"], "dropped": task.dropped,
                 **({"overlapping_entities": task.overlapping_entities} if task.spec.kind.labels_per_token else {}),
                 **{f"n_{split}": len(ds) for split, ds in task.splits.items()}},
        "baselines": {split: task.spec.kind.baselines(task.splits[split], task.spec) for split in data.evals},
        "per_example": {split: found for split, found in per_example.items() if found is not None},
        "method_summary": method.summary(raw_model),
        **({"inference": inference} if inference else {}),
        "precision": {"mixed_precision": t.mixed_precision, "quantization": models.quantization_name(cfg.model),
                      "stored_dtype": base.stored_dtype, "loaded_dtype": base.loaded_dtype,
                      "base_weight_bytes": params["base_weight_bytes"]},
        "backbone": identity["backbone"],
        "settings": cfg.changed_settings(),
        **({"teacher": identity["teacher"]} if identity["teacher"] else {}),
        "learning_rate": {"peak": t.lr, "method_default": method.default_lr},
        "checkpoint": str(out_dir / checkpoint.CHECKPOINT_DIR) if t.save_checkpoint else None,
        "total_steps": total_steps,
        **({"resumed_from": resumed_from} if resumed_from else {}),
    }
    return raw_model, data.tokenizer, result
