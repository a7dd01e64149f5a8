"""A fine-tuned run's checkpoint: its tensors gathered where sharded, written by the main process with the
base's identity and a model card."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from peftbench import checkpoint, distributed, models
from peftbench.config import RunConfig
from peftbench.methods import Method
from peftbench.train.setup import Data, hub_read


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
