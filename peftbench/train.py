"""Fine-tuning recipe: ``setup_data``, ``setup_model``, the one loop (``loop.fit``), ``evaluate``, ``save``.

Seed, data (the main process first: ``heartbeat.main_first``), model + method (what it trains is
declared, the rest frozen in one place), AdamW with linear warm-up/decay, dev
evaluation each epoch with ``gather_for_metrics``, the best dev state kept, test
evaluation of that state, checkpoint, record. The method and the task kind are
asked, never named.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from peftbench import checkpoint, distributed, models, tricks
from peftbench.config import RunConfig, require
from peftbench.data import Collator, eval_loader, train_loader
from peftbench.errors import DivergedError, PeftbenchError
from peftbench.heartbeat import main_first, wait_for_main
from peftbench.inference import serving_cost
from peftbench.loop import (
    Hooks,
    LoopState,
    build_optimizer,
    fit,
    make_accelerator,
    release,
    start_tracking,
    stop_tracking,
)
from peftbench.measure import stored_bytes, synchronize, unique_parameters
from peftbench.methods import Method, RunContext, get_method, lacked_modules, set_trainable, settle_dtypes
from peftbench.records import (
    RECORD_NAME,
    RunPhase,
    environment,
    failed_record_on_error,
    holds_success,
    make_record,
    write_atomic,
)
from peftbench.tasks import TaskData, load_task


def default_output_dir(cfg: RunConfig) -> str:
    return f"runs/{cfg.task.name}-{cfg.method.name}-{cfg.run_id[:8]}"


@dataclass
class RunResult:
    record: dict
    model: torch.nn.Module  # the trained model (best dev state), unwrapped
    tokenizer: object


@dataclass
class Data:
    task: TaskData
    tokenizer: object
    pair: bool  # sentence-pair task
    train: object  # prepared loaders
    evals: dict  # split -> prepared loader (dev, and test when labeled)
    sampler: object  # the training batch sampler (its epoch seeds the shuffle)
    encoded: dict  # split -> tokenised examples
    collator: Collator


def run(cfg: RunConfig, provenance: dict | None = None) -> RunResult:
    """Train and evaluate one configuration; write its record. A crash writes a failed record.

    The record and the checkpoint are built in a staging folder beside ``output_dir`` and swapped in
    together at the end (a failed run's record too, without a checkpoint, unless ``output_dir`` holds a
    successful run: that is kept); a run cut short by Ctrl-C leaves ``output_dir`` as it was. ``provenance``
    (e.g. the sweep a run belongs to) is stored in the record as is.
    """
    extra = {"provenance": provenance} if provenance else {}
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg)
    out_dir = Path(cfg.output_dir)
    stage = checkpoint.staging_dir(out_dir)
    launch = distributed.launch(cfg.train.sharding)  # before the accelerator: it takes an FSDP launch over
    accelerator = make_accelerator(cfg.train, cfg.train.compile, stage / checkpoint.TRACKERS_DIR)
    distributed.check(cfg, launch, accelerator.device.type == "cuda", get_method(cfg.method.name).reads_gradients,
                      accelerator)  # refuse what this launch cannot run, before any work
    main = accelerator.is_main_process
    if main:
        checkpoint.prepare_run_dir(out_dir)
    wait_for_main(accelerator, "preparing the run's folder")
    env = {**environment(accelerator.num_processes), **launch.describe()}
    start = time.perf_counter()
    start_tracking(accelerator, cfg.run_id, cfg.to_dict(), out_dir.parent)
    try:
        with failed_record_on_error(stage / RECORD_NAME, cfg.to_dict(), cfg.run_id, env, main, extra) as phase, \
                distributed.naming_lost_processes(accelerator.process_index, accelerator.num_processes,
                                                  cfg.train.dist_timeout):
            model, tokenizer, result = _fine_tune(cfg, accelerator, launch, stage, out_dir, phase, extra)
    except Exception as exc:
        stop_tracking(accelerator)
        if main:  # publish the failed record alone (no half-written checkpoint), or keep the old run if it succeeded
            shutil.rmtree(stage / checkpoint.CHECKPOINT_DIR, ignore_errors=True)
            exc.kept_success = holds_success(out_dir)
            if (stage / RECORD_NAME).is_file() and not exc.kept_success:
                checkpoint.publish(stage, out_dir)
            else:
                shutil.rmtree(stage, ignore_errors=True)
        raise
    result["metrics"]["wall_s"] = time.perf_counter() - start
    accelerator.log({f"final/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
                    step=result["total_steps"])
    stop_tracking(accelerator)
    record = make_record("success", cfg.to_dict(), cfg.run_id, env, result.pop("metrics"), result.pop("params"),
                         extra={**extra, **result})
    if main:
        write_atomic(stage / RECORD_NAME, record)
        checkpoint.publish(stage, out_dir)
        checkpoint.remove_state(checkpoint.training_state_dir(out_dir))  # the run is whole: nothing to resume
    wait_for_main(accelerator, "writing the checkpoint, timing the model and writing the record")
    release(accelerator)  # a sweep runs many cells in one process
    return RunResult(record, model, tokenizer)


def encode_task(cfg: RunConfig, splits: tuple[str, ...] | None = None):
    """The task's splits (``splits``; None: all), the tokenizer (built from the training texts where the
    backbone has none) and the encoded splits: ``(task, tokenizer, pair, {split: encoded})``."""
    task = load_task(cfg.task)
    train = task.splits["train"]
    tokenizer = models.load_tokenizer(cfg.model, list(train["text_a"]) + list(train["text_b"]))
    pair = any(train["text_b"])
    encoded = {split: task.spec.kind.encode(ds, tokenizer, task.spec, cfg.task.max_length, pair)
               for split, ds in task.splits.items() if splits is None or split in splits}
    return task, tokenizer, pair, encoded


def setup_data(cfg: RunConfig, accelerator: Accelerator) -> Data:
    """Load and tokenise the task's splits; length-grouped training batches, length-sorted evaluation batches."""
    t = cfg.train
    with main_first(accelerator, "reading and encoding the data"):
        task, tokenizer, pair, encoded = encode_task(cfg)
    cuda = accelerator.device.type == "cuda"
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else 1)
    train_dl = train_loader(encoded["train"], collator, t.batch_size, t.seed, t.group_by_length, pin_memory=cuda)
    evals = {split: eval_loader(encoded[split], collator, t.eval_batch_size, pin_memory=cuda)
             for split in ("dev", "test") if split == "dev" or (t.evaluate_test and task.labeled("test"))}
    sampler = train_dl.batch_sampler  # prepare() wraps it in a per-process shard
    train_dl, *prepared = accelerator.prepare(train_dl, *evals.values())
    return Data(task, tokenizer, pair, train_dl, dict(zip(evals, prepared)), sampler, encoded, collator)


def setup_model(cfg: RunConfig, accelerator: Accelerator, data: Data, total_steps: int, ckpt_dir: Path,
                launch: distributed.Launch = distributed.Launch("none")):
    """Backbone (quantised per ``model.quantization``), the method applied, the rest frozen, sharded when the
    launch shards; returns (model, method, parameter counts, :class:`models.LoadedBase`)."""
    set_seed(cfg.train.seed)  # before the model: init, dropout and method modules follow the seed
    method: Method = get_method(cfg.method.name)(cfg.method)
    kind, labels = data.task.spec.kind, data.task.spec.model_labels()
    save_base = cfg.train.save_checkpoint and accelerator.is_main_process and not method.saves_full_model
    quantized = cfg.model.quantization != "none"
    per_gpu = quantized and accelerator.device.type == "cuda"  # one quantised copy on each process's GPU
    model, base = models.load_model(cfg.model, labels, data.tokenizer, kind.auto_class,
                                    save_random_base=ckpt_dir / checkpoint.BASE_DIR if save_base else None,
                                    device_map={"": accelerator.local_process_index} if per_gpu else None,
                                    float_storage=launch.engine == "fsdp2")
    if cfg.train.save_checkpoint and not method.saves_full_model and models.is_random_init(cfg.model.name_or_path):
        wait_for_main(accelerator, "writing the random-init base")  # (the main process writes it)
    if save_base:  # the reload checks it is given this very base
        base.fingerprint = checkpoint.fingerprint(model)
        base.pretrained_fingerprint = checkpoint.fingerprint(model, pretrained_only=True,
                                                             new_weights=base.new_weights)
    limit = getattr(model.config, "max_position_embeddings", None)
    require(limit is None or cfg.task.max_length <= limit, "task.max_length",
            f"<= {limit} (the backbone's max_position_embeddings)", cfg.task.max_length)
    base_params = {id(p) for p in model.parameters()}
    if cfg.train.gradient_checkpointing:  # non-reentrant: works when the inputs need no gradient (frozen embeddings)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = method.apply(model, RunContext(total_steps, len(labels), kind.peft_task_type, kind.labels_per_token,
                                           lacked_modules(base.new_weights), base.float_weight))
    params = set_trainable(model, method)
    params.update(settle_dtypes(model, cfg.train.mixed_precision))
    params["base_weight_bytes"] = sum(stored_bytes(p) for p in unique_parameters(model) if id(p) in base_params)
    base.frozen = {n for n, p in model.named_parameters() if id(p) in base_params and not p.requires_grad}
    if launch.engine == "fsdp2":  # a method that reads whole gradients keeps its trained tensors whole
        replicate = {p for p in model.parameters() if p.requires_grad} if method.reads_gradients else set()
        model = distributed.shard(model, launch, cfg.train.mixed_precision, accelerator.device, replicate)
    return model, method, params, base


def hub_read(cfg: RunConfig, spec) -> list[str] | None:
    """The hub dataset and config the run read its task from (a model-index names it); None for a local folder,
    which may hold other splits (FewCLUE's are not CLUE's), or a task with no hub dataset."""
    return None if cfg.task.data_dir or not spec.hub else list(spec.hub)


def _fine_tune(cfg: RunConfig, accelerator: Accelerator, launch: distributed.Launch, work_dir: Path, out_dir: Path,
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
        state, rng, resumed_from = (_resume(cfg, accelerator, raw_model, optimizer, method, averager, state_dir,
                                            history, best) or (state, rng, resumed_from))

    def batches(epoch: int, skip: int):
        nonlocal rng
        loader = accelerator.skip_first_batches(data.train, skip) if skip else data.train
        loader.set_epoch(epoch)  # an Accelerate loader sets its sampler's epoch from its own count of passes
        data.sampler.set_epoch(epoch)  # (several processes: the shard inside it does not)
        if rng is None:
            return loader
        restore, rng = rng, None
        return _restoring_rng(loader, restore)

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


def load_teacher(cfg: RunConfig, data: Data, device) -> tuple[torch.nn.Module, dict]:
    """The frozen model of ``train.distill.teacher`` and what the record says of it; a teacher of another task,
    label set or tokenizer is refused in one line (its logits would not line up with the student's)."""
    from peftbench.inference import load

    path = cfg.train.distill.teacher
    model, tokenizer, meta = load(path, device)
    where = f"config key 'train.distill.teacher': {path}"
    if meta["task"] != cfg.task.name or meta["model_labels"] != data.task.spec.model_labels():
        raise PeftbenchError(f"{where} was trained on task '{meta['task']}' with labels {meta['model_labels']}; the "
                             f"student trains '{cfg.task.name}' with {data.task.spec.model_labels()}")
    if tokenizer.get_vocab() != data.tokenizer.get_vocab():
        raise PeftbenchError(f"{where} has another tokenizer ({len(tokenizer)} tokens) than the student's backbone "
                             f"({len(data.tokenizer)}): its inputs would be other token ids; distil into a backbone "
                             "that shares the teacher's tokenizer")
    return model, {"checkpoint": str(Path(path).resolve()), "run_id": meta["run_id"], "method": meta["method"],
                   "backbone": meta["config"]["model"]["name_or_path"]}


def backbone_identity(cfg: RunConfig, model_config) -> dict:
    """The record's ``backbone``: its name, whether it is random init, its fingerprint
    (:func:`checkpoint.backbone_fingerprint`) and, for a model ``peftbench pretrain`` made, where it came from."""
    name, random_init = cfg.model.name_or_path, models.is_random_init(cfg.model.name_or_path)
    arch = models.random_init_architecture(name) if random_init else model_config
    return {"name_or_path": name, "random_init": random_init,
            "fingerprint": checkpoint.backbone_fingerprint(name, arch, random_init),
            "pretrained_by_peftbench": checkpoint.pretrained_by_peftbench(name)}


def _resume(cfg: RunConfig, accelerator: Accelerator, raw_model, optimizer, method: Method,
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


def _restoring_rng(loader, rng: dict):
    """``loader``'s batches, with this process's RNG states restored once its first batch is fetched: the
    iterator draws a seed from the global generator, which the interrupted run did at the start of the epoch."""
    batches = iter(loader)
    first = next(batches, None)
    checkpoint.set_rng_state(rng)
    if first is not None:
        yield first
        yield from batches


def save(cfg: RunConfig, accelerator: Accelerator, launch: distributed.Launch, model, data: Data, method: Method,
         base: models.LoadedBase, ckpt_dir: Path, results: dict) -> int:
    """Write the checkpoint (main process) when the run keeps one; returns the bytes of the tensors the method
    saves, the record's ``adapter_bytes`` (the same with a checkpoint or without; the weights the base's source
    lacked aside). ``results`` (metrics, parameter counts) go into its model card. A sharded model's saved
    tensors are gathered first (all but the frozen base weights), so that the checkpoint is the one a single
    process writes."""
    raw_model = accelerator.unwrap_model(model)
    main = accelerator.is_main_process
    state = None
    if launch.engine == "fsdp2":
        state = distributed.gather_state(raw_model, lambda name: name not in base.frozen, main)
    elif launch.engine == "deepspeed" and cfg.train.save_checkpoint:
        state = accelerator.get_state_dict(model)
    # A method may run its root modules to save (PEFT's prompt encoder, whose forward reshards it again): each
    # use of them in a block of its own. Only the main process counts and writes.
    with distributed.whole_root(raw_model):
        size = method.saved_bytes(raw_model, state) if main else 0
    if cfg.train.save_checkpoint:
        with distributed.whole_root(raw_model):
            if main:
                _write_checkpoint(cfg, raw_model, data, method, base, ckpt_dir, results, state)
    return size


def _write_checkpoint(cfg: RunConfig, raw_model, data: Data, method: Method, base: models.LoadedBase, ckpt_dir: Path,
                      results: dict, state: dict | None) -> None:
    spec = data.task.spec
    base_meta = None
    final = Path(cfg.output_dir).resolve() / checkpoint.CHECKPOINT_DIR  # where the checkpoint will be
    if not method.saves_full_model:
        base_meta = {"source": base.source or checkpoint.BASE_DIR, "fingerprint": base.fingerprint,
                     "pretrained_fingerprint": base.pretrained_fingerprint,
                     "stored_dtype": base.stored_dtype, "loaded_dtype": base.loaded_dtype,
                     "new_weights": sorted(base.new_weights),
                     **({"quant_storage": base.quant_storage} if base.quant_storage != "uint8" else {})}
    data_dir = cfg.task.data_dir and models.source_name(cfg.task.data_dir)
    meta = {"method": cfg.method.name, "task": cfg.task.name, "kind": spec.kind.name, "labels": list(spec.labels),
            "label_names": list(spec.label_names or spec.labels), "model_labels": spec.model_labels(),
            "pair": data.pair, "max_length": cfg.task.max_length, "base": base_meta, "data_dir": data_dir,
            "run_id": cfg.run_id, "config": cfg.to_dict()}
    checkpoint.save_finetuned(ckpt_dir, raw_model, data.tokenizer, method, meta, state,
                              None if method.saves_full_model else base.new_weights,
                              base_name=base.source or str(final / checkpoint.BASE_DIR))
    checkpoint.write_model_card(ckpt_dir, final, meta, results["metrics"], results["params"],
                                spec.kind.auto_class_name, peft_format=hasattr(raw_model, "peft_config"),
                                hub_dataset=hub_read(cfg, spec))


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator, task: TaskData, split: str):
    """Metrics over exactly the split (``gather_for_metrics`` drops the padding samples of the last batch),
    with ``score``, the task's headline metric (accuracy; entity F1 for token classification).

    Returns (metrics, ids, predictions) in the loader's order: class indices, or span lists.
    """
    model.eval()
    synchronize(accelerator.device)
    start = time.perf_counter()
    kind, rows, finite = task.spec.kind, [], torch.ones((), dtype=torch.bool, device=accelerator.device)
    for batch in loader:
        logits = model(**batch["inputs"]).logits
        finite &= logits.isfinite().all()
        rows.append(kind.gather(accelerator, logits, batch))
    synchronize(accelerator.device)
    seconds = time.perf_counter() - start
    model.train()
    if not accelerator.reduce(finite.to(torch.int32), "sum").item() == accelerator.num_processes:
        raise DivergedError(f"diverged: {split} logits are not finite")
    metrics, ids, preds = kind.score(rows, task.spec, task.splits[split])
    metrics["eval_samples_per_s"] = len(ids) / seconds
    return metrics, ids, preds
