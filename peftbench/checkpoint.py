"""What peftbench writes to disk besides records, decided here for every writer and reader.

- A fine-tuned checkpoint (``<output_dir>/checkpoint/``): what the method trained
  (a PEFT adapter, the method's tensors, or a whole model), the tokenizer,
  ``peftbench.json`` (method, task, kind, labels, the resolved config, the base: where
  it comes from, its fingerprint and dtypes), the weights the base's source lacked
  (``base_new_weights.safetensors``: e.g. the pooler of a model saved without one,
  initialised at random by transformers) and, for a random-init backbone, the base
  itself in ``base/``.
- A pretrained model directory (``<output_dir>/model/``): a standard Hugging Face
  folder plus ``peftbench_pretrain.json``, how it was made.
- A run folder (``output_dir``): ``record.json``, ``checkpoint/`` and (with
  ``train.report_to``) ``trackers/``, built in a
  staging folder beside it and swapped in whole (:func:`publish`), so that a
  record never sits beside another run's weights.
- A resumable training state (``<output_dir>/checkpoint/`` of a pretraining run):
  Accelerate's model, optimizer and RNG states plus ``loop_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from peftbench.errors import PeftbenchError
from peftbench.records import RECORD_NAME, write_atomic

CHECKPOINT_DIR = "checkpoint"
META_FILE = "peftbench.json"
BASE_DIR = "base"  # a random-init backbone, saved beside the trained tensors: it cannot be rebuilt from a name
MODEL_DIR = "model"  # pretraining's result
PROVENANCE_FILE = "peftbench_pretrain.json"  # in a pretrained model directory: how it was made
LOOP_STATE_FILE = "loop_state.json"
NEW_WEIGHTS_FILE = "base_new_weights.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


TRACKERS_DIR = "trackers"  # experiment trackers' files (TensorBoard events), with train.report_to
RUN_FILES = (RECORD_NAME, CHECKPOINT_DIR, TRACKERS_DIR)  # all a run folder holds


def staging_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.staging")


def _retired_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.old")


def prepare_run_dir(out_dir: Path) -> Path:
    """Get ready to build a run of ``out_dir`` beside it; returns the new, empty staging folder.

    A swap that a kill cut short is completed (the new run was whole) or undone. A folder holding
    anything but a run's files is refused: publishing replaces the folder whole.
    """
    stage, old = staging_dir(out_dir), _retired_dir(out_dir)
    if not out_dir.exists() and old.exists():  # killed between the two renames of publish()
        os.replace(stage if (stage / RECORD_NAME).is_file() else old, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.is_file():
        raise PeftbenchError(f"config key 'output_dir': {out_dir} is a file, not a folder")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in RUN_FILES)
        if foreign:
            raise PeftbenchError(f"config key 'output_dir': {out_dir} holds '{foreign[0]}', which is not part of "
                                 "a peftbench run; a rerun replaces the folder whole: give an empty or a run's folder")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    return stage


def publish(stage: Path, out_dir: Path) -> None:
    """Swap the finished staging folder in for ``out_dir``: two renames, then the old run is deleted. A kill
    leaves the old complete run or the new one (:func:`prepare_run_dir` finishes a swap cut in between)."""
    old = _retired_dir(out_dir)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_finetuned(ckpt_dir: Path, model, tokenizer, method, meta: dict, state_dict: dict | None = None,
                   new_weights: dict | None = None) -> int:
    """Write a fine-tuned checkpoint; returns the bytes of its weight files.

    ``state_dict`` (gathered from FSDP shards) replaces the method's own saving. ``new_weights`` are the
    base's weights its source lacked, as initialised: without them a reload would draw new random ones.
    """
    if state_dict is not None:
        model.save_pretrained(str(ckpt_dir), state_dict=state_dict)
    else:
        method.save(model, ckpt_dir)
    if new_weights:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in new_weights.items()}, str(ckpt_dir / NEW_WEIGHTS_FILE))
    tokenizer.save_pretrained(str(ckpt_dir))
    write_atomic(ckpt_dir / META_FILE, meta)
    return sum(f.stat().st_size for f in ckpt_dir.iterdir() if f.suffix in WEIGHT_SUFFIXES)


def read_meta(ckpt_dir: Path) -> dict:
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise PeftbenchError(f"{ckpt_dir}: not a peftbench checkpoint ({META_FILE} missing)")
    return json.loads(path.read_text(encoding="utf-8"))


def base_source(ckpt_dir: Path, meta: dict) -> str | Path | None:
    """Where the base model of a checkpoint comes from: None (the checkpoint is a whole model), its own
    ``base/`` folder (random-init backbone), or the hub name / absolute directory it was trained on."""
    if meta["base"] is None:
        return None
    return ckpt_dir / BASE_DIR if meta["base"]["source"] == BASE_DIR else meta["base"]["source"]


VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures")  # where and how, not what


def fingerprint(model) -> str:
    """A base model's identity: sha256 over its configuration and every tensor's name, dtype, shape and
    bytes. Computed right after loading (before a method changes the model), at training and at reload."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_base(ckpt_dir: Path, meta: dict, source, found: str) -> None:
    """Refuse a base that is not the one the checkpoint was trained on: its tensors would be fitted to another."""
    expected = meta["base"]["fingerprint"]
    if found != expected:
        raise PeftbenchError(f"{ckpt_dir / META_FILE}: field 'base.fingerprint': the base '{source}' is not the "
                             f"model this checkpoint was trained on (fingerprint {found[:12]}, trained on "
                             f"{expected[:12]} from '{meta['base']['source']}'); pass the right base")


def read_new_weights(ckpt_dir: Path) -> dict:
    """The base weights a checkpoint stores because its base's source lacked them (empty when none)."""
    path = ckpt_dir / NEW_WEIGHTS_FILE
    if not path.is_file():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def save_pretrained_model(model, tokenizer, directory: Path, provenance: dict) -> None:
    """A standard Hugging Face directory; LoRA adapters are merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    write_atomic(directory / PROVENANCE_FILE, provenance)


def pretrained_by_peftbench(model_dir: str) -> dict | None:
    """The pretraining summary saved with a model directory, if peftbench made it."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {"run_id": summary["run_id"], "corpus": summary["data"]["files"], "steps": summary["metrics"]["steps"],
            "mlm_loss": summary["metrics"]["mlm_loss"], "device": summary["env"].get("device_name")}


def save_training_state(accelerator, state: dict, run_id: str, ckpt: Path) -> None:
    """Model, optimizer and RNG states plus the loop position, replaced as a whole (never half-written)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_atomic(tmp / LOOP_STATE_FILE, {**state, "run_id": run_id})
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    accelerator.wait_for_everyone()


def check_rng_state(ckpt: Path, process_index: int) -> None:
    """Refuse to resume without this process's RNG state: Accelerate only logs an unreadable one and goes on,
    and the resumed run would silently differ from an uninterrupted one."""
    path = ckpt / f"random_states_{process_index}.pkl"
    try:
        torch.load(path, weights_only=False)
    except Exception as exc:  # missing, truncated, not a pickle
        raise PeftbenchError(f"{path}: the RNG state cannot be read ({type(exc).__name__}), so the run cannot "
                             "resume exactly; delete the checkpoint folder to start over") from None


def read_training_state(ckpt: Path, run_id: str) -> dict | None:
    """The loop position of a resumable checkpoint of run ``run_id`` (None when there is none)."""
    path = ckpt / LOOP_STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.pop("run_id") != run_id:
        raise PeftbenchError(f"{ckpt}: a checkpoint of a different configuration; use another output_dir "
                             "or delete the checkpoint")
    return state
