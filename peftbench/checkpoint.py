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

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from peftbench.errors import PeftbenchError, clip
from peftbench.heartbeat import wait_for_main
from peftbench.records import RECORD_NAME, settle_modes, write_atomic

CHECKPOINT_DIR = "checkpoint"
META_FILE = "peftbench.json"
BASE_DIR = "base"  # a random-init backbone, saved beside the trained tensors: it cannot be rebuilt from a name
MODEL_DIR = "model"  # pretraining's result
PROVENANCE_FILE = "peftbench_pretrain.json"  # in a pretrained model directory: how it was made
LOOP_STATE_FILE = "loop_state.json"
NEW_WEIGHTS_FILE = "base_new_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


TRACKERS_DIR = "trackers"  # experiment trackers' files (TensorBoard events), with train.report_to
RUN_FILES = (RECORD_NAME, CHECKPOINT_DIR, TRACKERS_DIR)  # all a run folder holds


def _real(out_dir: Path) -> Path:
    """``out_dir`` as an absolute path; a link as the folder it names, where the run then lands (the link stays)."""
    out_dir = Path(os.path.abspath(out_dir))
    return out_dir.resolve() if out_dir.is_symlink() else out_dir


def staging_dir(out_dir: Path) -> Path:
    """Where a run of ``out_dir`` is built: beside it (so ``out_dir`` needs a parent: not the root folder); beside
    the folder a link names, so that the swap stays on that folder's disk."""
    out_dir = _real(out_dir)
    if not out_dir.name:
        raise PeftbenchError(f"config key 'output_dir': {out_dir} is the root folder; a run needs a folder of its "
                             "own (it replaces the folder whole)")
    return out_dir.with_name(f".{out_dir.name}.staging")


def _retired_dir(out_dir: Path) -> Path:
    out_dir = _real(out_dir)
    return out_dir.with_name(f".{out_dir.name}.old")


def prepare_run_dir(out_dir: Path) -> Path:
    """Get ready to build a run of ``out_dir`` beside it; returns the new, empty staging folder.

    A swap that a kill cut short is completed (the new run was whole) or undone. A folder holding
    anything but a run's files is refused: publishing replaces the folder whole.
    """
    out_dir = _real(out_dir)
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
    out_dir = _real(out_dir)
    old = _retired_dir(out_dir)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_finetuned(ckpt_dir: Path, model, tokenizer, method, meta: dict, state_dict: dict | None = None,
                   new_weights: dict | None = None, base_name: str | None = None) -> None:
    """Write a fine-tuned checkpoint.

    ``state_dict`` (the tensors of a sharded model, gathered) is what the method saves instead of the model's
    own shards. ``new_weights`` are the base's weights its source lacked, as initialised: without them a reload
    would draw new random ones. ``base_name`` goes into a PEFT adapter's config, where plain PEFT
    (AutoPeftModel) looks for the base.
    """
    method.save(model, ckpt_dir, state_dict)
    adapter_config = ckpt_dir / PEFT_CONFIG_FILE
    if base_name and adapter_config.is_file():
        write_atomic(adapter_config, {**json.loads(adapter_config.read_text(encoding="utf-8")),
                                      "base_model_name_or_path": base_name})
    if new_weights:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in new_weights.items()}, str(ckpt_dir / NEW_WEIGHTS_FILE))
    tokenizer.save_pretrained(str(ckpt_dir))
    write_atomic(ckpt_dir / META_FILE, meta)
    settle_modes(ckpt_dir)


META_FIELDS = ("method", "task", "kind", "labels", "label_names", "model_labels", "base", "config")


def read_meta(ckpt_dir: Path) -> dict:
    """``peftbench.json`` of a checkpoint whose files were checked first (:func:`check_files`)."""
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise PeftbenchError(f"{ckpt_dir}: not a peftbench checkpoint ({META_FILE} missing)")
    check_files(ckpt_dir)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise PeftbenchError(f"{path}{line}: not valid JSON ({clip(exc)})") from None
    if not isinstance(meta, dict):
        raise PeftbenchError(f"{path}: not a JSON object")
    missing = [key for key in META_FIELDS if key not in meta]
    if missing:
        raise PeftbenchError(f"{path}: field '{missing[0]}' missing: a checkpoint of an earlier peftbench, which "
                             "did not record its base's identity; train it again")
    return meta


def check_files(ckpt_dir: Path) -> None:
    """Refuse a checkpoint with a link that leaves its folder (a ``tokenizer.json`` pointing at /etc/passwd, a
    weight file from elsewhere) or a safetensors file that is cut short or not one."""
    root = ckpt_dir.resolve()
    for path in sorted(Path(d) / name for d, dirs, files in os.walk(ckpt_dir) for name in dirs + files):
        if path.is_symlink() and not path.resolve().is_relative_to(root):  # a folder or a file
            raise PeftbenchError(f"{path}: a link to {path.resolve()}, outside the checkpoint; a checkpoint reads "
                                 "only its own files (copy the file in)")
        if path.suffix == ".safetensors" and path.is_file():
            problem = _safetensors_problem(path)
            if problem:
                raise PeftbenchError(f"{path}: damaged weight file ({problem}); copy or train the checkpoint again")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (an 8-byte header length, a JSON header, then exactly the
    bytes its tensors' offsets cover), or None."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"header of {length} bytes in a file of {size}"
        try:
            header = json.loads(fh.read(length))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            return "unreadable header"
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ends):
        return "unreadable header"
    end = max(ends, default=0)
    if size != 8 + length + end:
        return f"{size} bytes where its header describes {8 + length + end}"
    return None


def base_source(ckpt_dir: Path, meta: dict) -> str | Path | None:
    """Where the base model of a checkpoint comes from: None (the checkpoint is a whole model), its own
    ``base/`` folder (random-init backbone), or the hub name / absolute directory it was trained on."""
    if meta["base"] is None:
        return None
    return ckpt_dir / BASE_DIR if meta["base"]["source"] == BASE_DIR else meta["base"]["source"]


VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures")  # where and how, not what


LABEL_CONFIG_KEYS = ("id2label", "label2id")  # the task's, not the base's


def fingerprint(model, pretrained_only: bool = False, new_weights=()) -> str:
    """A base model's identity: sha256 over its configuration and every tensor's name, dtype, shape and
    bytes. Computed right after loading (before a method changes the model), at training and at reload.
    ``pretrained_only``: what the base's source provided, without the label names and ``new_weights`` (the
    head and other modules initialised for the run): equal for every run on one pretrained base."""
    skip = VOLATILE_CONFIG_KEYS + (LABEL_CONFIG_KEYS if pretrained_only else ())
    config = {k: v for k, v in model.config.to_dict().items() if k not in skip}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        if pretrained_only and name in new_weights:
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


BACKBONE_FILES = ("config.json", "*.safetensors", "*.bin", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json", "*.model")  # what a backbone folder is


def backbone_fingerprint(name_or_path: str, architecture, random_init: bool) -> str:
    """What a record calls its backbone, independent of how a run loads it (precision, quantisation, head),
    taken when the run loads it: a random-init backbone by its architecture (a dict: its character vocabulary
    follows from the task's training text, which the data fingerprint covers); a local folder by its config,
    weight and tokenizer files; a hub model by its name and the commit its cached files came from."""
    if random_init:
        return hashlib.sha256(json.dumps(architecture, sort_keys=True, default=str).encode()).hexdigest()
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        files = sorted({p for pattern in BACKBONE_FILES for p in folder.glob(pattern) if p.is_file()})
        return _files_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    return hashlib.sha256(f"hub:{name_or_path}@{_hub_commit(name_or_path)}".encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _files_digest(files: tuple) -> str:
    """SHA-256 over files' names and bytes; cached by (path, size, mtime): a sweep hashes a backbone once."""
    digest = hashlib.sha256()
    for path, size, _ in files:
        digest.update(f"{Path(path).name}|{size}\n".encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _hub_commit(name: str) -> str | None:
    """The commit of the hub model's cached files (the snapshot folder its config.json lies in)."""
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", local_files_only=True)
    except Exception:  # not cached, or an older layout: the name alone
        return None
    return Path(path).parent.name if path and Path(path).parent.parent.name == "snapshots" else None


def pretrained_fingerprint(meta: dict) -> str:
    """The fingerprint of the pretrained base a checkpoint was trained on (checkpoints written before it was
    recorded: the fingerprint of the whole base)."""
    return meta["base"].get("pretrained_fingerprint", meta["base"]["fingerprint"])


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


def stage_pretrained_model(model, tokenizer, directory: Path, provenance: dict, files: dict[str, Path] | None = None
                           ) -> Path:
    """A standard Hugging Face directory written beside ``directory`` (LoRA adapters merged into the weights,
    ``files`` copied in by name: a vocabulary); returns it, for :func:`swap_in` to put in ``directory``'s place."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name, source in (files or {}).items():
        shutil.copy2(source, tmp / name)
    write_atomic(tmp / PROVENANCE_FILE, provenance)
    settle_modes(tmp)
    return tmp


def pretrained_by_peftbench(model_dir: str) -> dict | None:
    """The pretraining summary saved with a model directory, if peftbench made it."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {"run_id": summary["run_id"], "corpus": summary["data"]["files"], "steps": summary["metrics"]["steps"],
            "mlm_loss": summary["metrics"]["mlm_loss"], "device": summary["env"].get("device_name")}


def save_training_state(accelerator, state: dict, run_id: str, where: Path) -> None:
    """Accelerate's model, optimizer and RNG states plus the loop position, replaced as a whole (a kill leaves the
    last whole one: :func:`whole_state_dir`). The other processes wait for the main one's writing while its
    heartbeat goes on (:func:`heartbeat.wait_for_main`)."""
    tmp = where.with_name(where.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    wait_for_main(accelerator, "clearing the last training state's folder")
    accelerator.save_state(str(tmp))
    wait_for_main(accelerator, "writing a training state")  # every process's RNG state is in before the swap
    if accelerator.is_main_process:
        write_atomic(tmp / LOOP_STATE_FILE, {**state, "run_id": run_id, "processes": accelerator.num_processes})
        swap_in(tmp, where)
    wait_for_main(accelerator, "swapping a training state in")


def training_state_dir(out_dir: Path) -> Path:
    """Where a fine-tuning run of ``out_dir`` keeps its resumable training state: beside it, like its staging
    folder, so that a rerun replacing ``out_dir`` leaves it, and deleted once the run has published."""
    return staging_dir(out_dir).with_name(f".{Path(os.path.abspath(out_dir)).name}.state")


def rng_state() -> dict:
    """Every random generator a training step may draw from (Python, NumPy, torch on the CPU and each GPU)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loads as weights only
    return {"python": random.getstate(), "numpy": numpy_state,
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_process_states(accelerator, state: dict, tensors: dict, run_id: str, where: Path) -> None:
    """A resumable state: each process's ``tensors`` (trained weights, optimizer, ...; empty where they are the
    main process's) with its RNG states, and
    the loop position ``state`` (main process), replaced as a whole (a kill leaves the last whole one). On
    several machines, ``where`` must be a folder they share. The other processes wait for the main one's writing
    while its heartbeat goes on (:func:`heartbeat.wait_for_main`)."""
    tmp, main = where.with_name(where.name + ".tmp"), accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    wait_for_main(accelerator, "clearing the last training state's folder")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({**tensors, "rng": rng_state()}, tmp / f"process_{accelerator.process_index}.pt")
    wait_for_main(accelerator, "writing a training state")
    if main:
        write_atomic(tmp / LOOP_STATE_FILE, {**state, "run_id": run_id, "processes": accelerator.num_processes})
        settle_modes(tmp)
        swap_in(tmp, where)
    wait_for_main(accelerator, "swapping a training state in")


def swap_in(tmp: Path, where: Path) -> None:
    """Replace the folder ``where`` by ``tmp``: the last whole one steps aside until the new one is in place
    (:func:`whole_state_dir` finds it after a kill between the renames; :func:`restore_cut_swap` puts it back)."""
    old = where.with_name(where.name + ".old")
    if where.exists():
        shutil.rmtree(old, ignore_errors=True)
        where.rename(old)
    tmp.rename(where)
    shutil.rmtree(old, ignore_errors=True)


def whole_state_dir(where: Path) -> Path:
    """``where``, or the state that stepped aside for it when a kill came between the two renames."""
    old = where.with_name(where.name + ".old")
    return old if not where.exists() and old.exists() else where


def restore_cut_swap(where: Path) -> None:
    """Put back the folder that stepped aside for ``where`` when a kill came between :func:`swap_in`'s renames."""
    old = where.with_name(where.name + ".old")
    if not where.exists() and old.exists():
        old.rename(where)


def remove_state(where: Path) -> None:
    for path in (where, where.with_name(where.name + ".tmp"), where.with_name(where.name + ".old")):
        shutil.rmtree(path, ignore_errors=True)


def load_process_state(where: Path, process_index: int) -> dict:
    """This process's tensors of a state :func:`save_process_states` wrote, refused in one line when unreadable."""
    path = where / f"process_{process_index}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a torch file
        raise PeftbenchError(f"{path}: the training state cannot be read ({type(exc).__name__}), so the run cannot "
                             f"resume exactly; delete {where} to start over") from None


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


CARD_FILE = "README.md"


def write_model_card(ckpt_dir: Path, final_dir: Path, meta: dict, metrics: dict, params: dict, auto: str,
                     peft_format: bool, hub_dataset: tuple[str, str] | None = None) -> None:
    """``README.md`` of a checkpoint written in ``ckpt_dir`` that will be used from ``final_dir``: what it is (base,
    task, method, scores, trainable parameters) and how to load it with peftbench and, where the format allows,
    with transformers and PEFT alone (``auto``: the task kind's class, e.g. AutoModelForSequenceClassification).
    Its front matter holds the scores as a ``model-index`` (``hub_dataset``: the task's hub dataset and config)."""
    from huggingface_hub import ModelCardData

    from peftbench.model_index import eval_results

    base = meta["base"]
    where = str(final_dir)
    source = base and (str(final_dir / BASE_DIR) if base["source"] == BASE_DIR else base["source"])
    hub_base = source if base and not Path(source).is_absolute() else None
    settings = meta["config"]["method"]
    score = metrics["score_name"]
    rows = [("task", f"`{meta['task']}` ({len(meta['labels'])} labels)"),
            ("method", f"`{meta['method']}` " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "name")),
            ("base", f"`{source}`, fingerprint `{base['fingerprint'][:12]}`, stored as {base['stored_dtype']}"
             if base else "the whole model is in this folder"),
            ("trainable parameters",
             f"{params['trainable']:,} of {params['total']:,} ({params['trainable_pct']:.2f} %)"),
            (f"dev {score}", f"{metrics['score']:.4f} (best epoch {metrics['best_epoch']})")]
    if f"test_{score}" in metrics:
        rows.append((f"test {score}", f"{metrics[f'test_{score}']:.4f}"))
    card = ModelCardData(library_name="peft" if peft_format else "transformers", base_model=hub_base,
                         tags=["peftbench", meta["method"], meta["task"]],
                         model_name=f"{meta['task']}-{meta['method']}-{meta['run_id']}",
                         eval_results=eval_results(meta["task"], hub_dataset, meta["kind"], metrics))
    lines = ["---", card.to_yaml(), "---", "", f"# {meta['task']} · {meta['method']}", "",
             f"Fine-tuned with peftbench (run `{meta['run_id']}`).", "", "| | |", "|---|---|",
             *[f"| {k} | {v} |" for k, v in rows], "", "## Load with peftbench", "", "```python", "import peftbench",
             "", f'model, tokenizer, meta = peftbench.load("{where}")  # base= for the same base elsewhere',
             "```", "", "## Load without peftbench", ""]
    labels = {i: name for i, name in enumerate(meta["model_labels"])}
    if base is None:
        lines += ["```python", f"from transformers import {auto}, AutoTokenizer", "",
                  f'model = {auto}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
                  "```"]
    elif peft_format:  # the adapter names its base, and holds the head and any module the base's files lack
        auto_peft = auto.replace("AutoModelFor", "AutoPeftModelFor")
        lines += ["```python", f"from peft import {auto_peft}", "from transformers import AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', f"id2label = {labels!r}",
                  f'model = {auto_peft}.from_pretrained("{where}", id2label=id2label, '
                  "label2id={v: k for k, v in id2label.items()},", "                                  "
                  'pad_token_id=tokenizer.pad_token_id, dtype="float32").eval()  # fp32, as trained', "```", "",
                  "On a decoder, a method that feeds embeddings (prompt tuning) needs the last position to be a real "
                  "token: pad on the left. `peftbench.load` handles either side (peftbench's docs/models.md)."]
    else:
        lines += [f"Method `{meta['method']}` adds modules that transformers does not have: load it with peftbench."]
    (ckpt_dir / CARD_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
