"""A run's data (read and encoded, the main process first) and model (backbone, method applied, the rest frozen,
sharded when the launch shards), and the identities its record keeps of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from peftbench import checkpoint, distributed, models
from peftbench.config import RunConfig, require
from peftbench.data import Collator, eval_loader, train_loader
from peftbench.errors import PeftbenchError
from peftbench.heartbeat import main_first, wait_for_main
from peftbench.measure import stored_bytes, unique_parameters
from peftbench.methods import Method, RunContext, get_method, lacked_modules, set_trainable, settle_dtypes
from peftbench.tasks import TaskData, load_task


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
