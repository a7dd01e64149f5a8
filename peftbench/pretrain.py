"""Masked-LM pretraining: ``peftbench pretrain RECIPE.yaml [key=value ...]``.

Domain-adaptive (continued) pretraining of a hub or local checkpoint, or
pretraining from a config with a character vocabulary built from the corpus.
Text is packed into fixed-length blocks ([CLS] ... [SEP], documents separated
by [SEP]); each micro-batch is masked BERT-style (15 % of the non-special
tokens, or of the words with ``mask.whole_word``; of those 80 % [MASK], 10 % a
random token, 10 % unchanged). The loop is the same Accelerate loop as
fine-tuning, with a step and/or time budget; a checkpoint is written every
``train.save_every`` steps and an interrupted run resumes from it exactly.
The result is a standard Hugging Face model directory (config, safetensors,
tokenizer with ``vocab.txt``) that ``peftbench run model.name_or_path=DIR``
fine-tunes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from peftbench import config as config_lib
from peftbench.data import LengthGroupedBatchSampler
from peftbench.errors import PeftbenchError, where
from peftbench.measure import StepTimer, peak_memory_mb, reset_peak_memory
from peftbench.models import build_char_vocab
from peftbench.records import environment, make_record, write_atomic
from peftbench.tasks import LAYOUTS, read_records

RECORD_NAME = "pretrain_record.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"
PROVENANCE_FILE = "peftbench_pretrain.json"  # in the saved model directory: how it was made
# Evaluation files of every data layout, plus FewCLUE's per-split dev/test files.
EVAL_FILE = re.compile("|".join([re.escape(n[s]) for n in LAYOUTS.values() for s in ("dev", "test")]
                                + [r"dev_\d+\.json", r"test_public\.json"]))


@dataclass
class CorpusConfig:
    files: list[str] = field(default_factory=list)  # JSON lines (.json/.jsonl) or plain text (one document per line)
    text_fields: list[str] = field(default_factory=lambda: ["sentence", "content", "text"])  # JSON: each present field is a document
    eval_fraction: float = 0.01  # held-out blocks for the MLM loss
    allow_eval_text: bool = False  # permit files named like a task's dev/test file


@dataclass
class PretrainModelConfig:
    name_or_path: str | None = None  # continued pretraining from a hub name or local directory
    from_scratch: bool = False  # build from ``architecture`` with a char vocabulary made from the corpus
    model_type: str = "bert"
    architecture: dict = field(default_factory=dict)  # config overrides, e.g. hidden_size, num_hidden_layers
    vocab_min_freq: int = 2
    lora_r: int = 0  # > 0: continued pretraining trains LoRA adapters, merged into the saved model
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])


@dataclass
class MaskConfig:
    block_size: int = 128
    probability: float = 0.15
    whole_word: bool = False  # mask whole words (Chinese: segmented with jieba)


@dataclass
class PretrainTrainConfig(config_lib.LoopConfig):
    max_steps: int = 1000
    max_minutes: float = 0.0  # > 0: also stop after this much training time; the LR schedule follows the budget
    batch_size: int = 64
    lr: float = 5e-4
    warmup_ratio: float = 0.06
    log_every: int = 20  # optimizer steps between loss reads and time-budget checks
    eval_every: int = 200
    save_every: int = 200
    timing_warmup_steps: int = 3


@dataclass
class PretrainConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    output_dir: str = "runs/pretrain"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_id(self) -> str:
        body = self.to_dict()
        body.pop("output_dir")
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_config(recipe: str | None, overrides: list[str]) -> PretrainConfig:
    tree = config_lib.read_recipe(recipe) if recipe else {}
    tree = config_lib.merge(tree, config_lib.parse_overrides(overrides))
    cfg = config_lib.build(PretrainConfig, tree, "")
    if not cfg.corpus.files:
        raise PeftbenchError("config key 'corpus.files': give at least one text file")
    if cfg.model.from_scratch == (cfg.model.name_or_path is not None):
        raise PeftbenchError("config keys 'model.name_or_path' / 'model.from_scratch': set exactly one")
    if cfg.model.from_scratch and cfg.model.lora_r:
        raise PeftbenchError("config key 'model.lora_r': LoRA needs pretrained weights (not model.from_scratch)")
    if cfg.train.mixed_precision not in config_lib.MIXED_PRECISION:
        raise PeftbenchError(f"config key 'train.mixed_precision' must be one of {config_lib.MIXED_PRECISION}")
    if not 0 < cfg.mask.probability < 1:
        raise PeftbenchError(f"config key 'mask.probability' must be in (0, 1), got {cfg.mask.probability}")
    if cfg.mask.block_size < 8:
        raise PeftbenchError(f"config key 'mask.block_size' must be >= 8, got {cfg.mask.block_size}")
    if not 0 < cfg.corpus.eval_fraction < 0.5:
        raise PeftbenchError(f"config key 'corpus.eval_fraction' must be in (0, 0.5), got {cfg.corpus.eval_fraction}")
    return cfg


# ---------------------------------------------------------------- corpus

def check_not_eval_text(path: Path, allow: bool) -> None:
    """Refuse a dev/test file of a task layout: pretraining on it leaks evaluation text into every score."""
    if EVAL_FILE.fullmatch(path.name) and not allow:
        raise PeftbenchError(f"{path}: named like a task's dev/test file; pretraining on evaluation text leaks it "
                             "into every fine-tuned score (set corpus.allow_eval_text=true to use it anyway)")


def read_documents(paths: list[str], text_fields: list[str], allow_eval_text: bool = False) -> list[str]:
    """Every non-empty document of the corpus files, in order."""
    docs = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise PeftbenchError(f"config key 'corpus.files': file not found: {path}")
        check_not_eval_text(path, allow_eval_text)
        if path.suffix in (".json", ".jsonl"):
            for lineno, record in read_records(path):
                texts = [record[f] for f in text_fields if isinstance(record.get(f), str)]
                if not any(f in record for f in text_fields):
                    raise PeftbenchError(f"{where(path, lineno, '/'.join(text_fields))}: no text field "
                                         f"(record keys: {', '.join(record)}; set corpus.text_fields)")
                docs.extend(t.strip() for t in texts if t.strip())
        else:
            with path.open(encoding="utf-8", newline="\n") as fh:
                docs.extend(line.strip() for line in fh if line.strip())
    if not docs:
        raise PeftbenchError(f"config key 'corpus.files': no text in {', '.join(paths)}")
    return docs


def _word_starts(text: str) -> list[int]:
    """Character offsets where a word starts (jieba segmentation)."""
    import jieba

    starts, pos = [], 0
    for word in jieba.lcut(text):
        starts.append(pos)
        pos += len(word)
    return starts


def pack(docs: list[str], tokenizer, block_size: int, whole_word: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (separated by [SEP]) into blocks ``[CLS] ... [SEP]`` of ``block_size`` tokens.

    Returns (input_ids, word_ids), both ``[n_blocks, block_size]``; ``word_ids`` numbers the
    words (one per token unless ``whole_word``) and is -1 on special tokens. The tail that does
    not fill a block is dropped.
    """
    if whole_word:
        try:
            import jieba

            jieba.setLogLevel(60)
        except ImportError:
            raise PeftbenchError("config key 'mask.whole_word': needs jieba (pip install jieba)") from None
    sep, body = tokenizer.sep_token_id, block_size - 2
    ids, words, word = [], [], 0
    for start in range(0, len(docs), 1000):
        chunk = docs[start : start + 1000]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=whole_word)
        for i, doc_ids in enumerate(enc["input_ids"]):
            if whole_word:
                starts = set(_word_starts(chunk[i]))
                for j, (s, _) in enumerate(enc["offset_mapping"][i]):
                    word += j == 0 or s in starts
                    words.append(word)
            else:
                words.extend(range(word + 1, word + 1 + len(doc_ids)))
                word += len(doc_ids)
            ids.extend(doc_ids)
            ids.append(sep)
            words.append(-1)
            word += 1
    n_blocks = len(ids) // body
    if n_blocks == 0:
        raise PeftbenchError(f"the corpus holds {len(ids)} tokens, fewer than one block of {block_size}")
    ids = torch.tensor(ids[: n_blocks * body]).view(n_blocks, body)
    words = torch.tensor(words[: n_blocks * body]).view(n_blocks, body)
    column = torch.full((n_blocks, 1), -1)
    input_ids = torch.cat([torch.full((n_blocks, 1), tokenizer.cls_token_id), ids, torch.full((n_blocks, 1), sep)], 1)
    return input_ids, torch.cat([column, words, column], 1)


def mask_tokens(input_ids: torch.Tensor, word_ids: torch.Tensor, probability: float, mask_id: int,
                random_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking over words: each word (``word_ids``; -1 = special, never masked) is chosen with
    ``probability``; a chosen word's tokens become [MASK] (80 %), random tokens drawn from
    ``random_ids`` (10 %), or stay (10 %). Returns (inputs, labels); labels are -100 off the chosen tokens.

    One draw per word, so whole-word and per-token masking share this code. (transformers'
    whole-word masking groups tokens by character offsets, which joins an unspaced Chinese
    sentence into one word, and it drops the random/unchanged 20 %.) Draws come from
    ``generator`` on the CPU, so a run is reproducible and resumable on any device.
    """
    real = word_ids >= 0
    words, inverse = torch.unique(word_ids[real], return_inverse=True)
    chosen_word = torch.rand(len(words), generator=generator) < probability
    action = torch.rand(len(words), generator=generator)  # < .8 mask, < .9 random, else keep
    random_tokens = random_ids[torch.randint(len(random_ids), (int(real.sum()),), generator=generator)]
    device = input_ids.device
    chosen = torch.zeros_like(real)
    chosen[real] = chosen_word.to(device)[inverse]
    act = torch.ones(real.shape, device=device)
    act[real] = action.to(device)[inverse]
    inputs, labels = input_ids.clone(), input_ids.clone()
    labels[~chosen] = -100
    inputs[chosen & (act < 0.8)] = mask_id
    swap = chosen & (act >= 0.8) & (act < 0.9)
    rand_full = input_ids.clone()
    rand_full[real] = random_tokens.to(device)
    inputs[swap] = rand_full[swap]
    return inputs, labels


# ---------------------------------------------------------------- model

def _load_tokenizer(cfg: PretrainConfig, out_dir: Path, docs: list[str], fresh: bool):
    """From scratch: a char vocabulary of the corpus (built on a fresh start, re-read on resume)."""
    from transformers import AutoTokenizer, BertTokenizer

    m = cfg.model
    if not m.from_scratch:
        try:
            tokenizer = AutoTokenizer.from_pretrained(m.name_or_path)
        except OSError as exc:
            raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{m.name_or_path}' ({exc})") from None
        if tokenizer.mask_token_id is None:
            raise PeftbenchError(f"config key 'model.name_or_path': tokenizer of '{m.name_or_path}' has no mask token")
        return tokenizer
    vocab = out_dir / MODEL_DIR / "vocab.txt"
    if fresh:
        vocab.parent.mkdir(parents=True, exist_ok=True)
        vocab.write_text("\n".join(build_char_vocab(docs, m.vocab_min_freq)) + "\n", encoding="utf-8")
    return BertTokenizer(vocab=str(vocab), do_lower_case=True)


def _load_model(cfg: PretrainConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForMaskedLM

    m = cfg.model
    if m.from_scratch:
        arch = {"max_position_embeddings": max(512, cfg.mask.block_size), **m.architecture}
        try:
            model_config = AutoConfig.for_model(m.model_type, vocab_size=len(tokenizer),
                                                pad_token_id=tokenizer.pad_token_id, **arch)
        except (ValueError, TypeError) as exc:
            raise PeftbenchError(f"config key 'model.architecture': {exc}") from None
        return AutoModelForMaskedLM.from_config(model_config)
    try:
        model = AutoModelForMaskedLM.from_pretrained(m.name_or_path)
    except OSError as exc:
        raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{m.name_or_path}' ({exc})") from None
    if m.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=2 * m.lora_r, lora_dropout=0.0,
                                                 target_modules=m.lora_target_modules))
    return model


def _save_model(model, tokenizer, directory: Path, provenance: dict) -> None:
    """A standard Hugging Face directory; LoRA adapters are merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    write_atomic(directory / PROVENANCE_FILE, provenance)


# ---------------------------------------------------------------- loop

def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) masked-LM pretraining; returns the record (also written to ``output_dir``)."""
    AcceleratorState._reset_state()
    t = cfg.train
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision,
                              gradient_accumulation_steps=t.grad_accum_steps)
    out_dir = Path(cfg.output_dir)
    ckpt = out_dir / CHECKPOINT_DIR
    state = _resume_state(cfg, ckpt)
    env = environment(accelerator.num_processes)
    start = time.perf_counter()

    with accelerator.main_process_first():
        docs = read_documents(cfg.corpus.files, cfg.corpus.text_fields, cfg.corpus.allow_eval_text)
        set_seed(t.seed)
        tokenizer = _load_tokenizer(cfg, out_dir, docs, fresh=state is None)
        model = _load_model(cfg, tokenizer)
        input_ids, word_ids = pack(docs, tokenizer, cfg.mask.block_size, cfg.mask.whole_word)
    split = torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(t.seed))
    n_eval = max(1, round(cfg.corpus.eval_fraction * len(input_ids)))
    eval_idx, train_idx = split[:n_eval], split[n_eval:]
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in set(special.tolist())])

    sampler = LengthGroupedBatchSampler([cfg.mask.block_size] * len(train_idx), t.batch_size, t.seed, False)
    blocks = torch.utils.data.TensorDataset(input_ids[train_idx], word_ids[train_idx])
    # Its own generator: creating an iterator then draws no number from the global RNG, which the resumed
    # run (a new iterator mid-epoch) would otherwise consume differently from the uninterrupted one.
    train_dl = DataLoader(blocks, batch_sampler=sampler, generator=torch.Generator())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if p.requires_grad and p.ndim >= 2], "weight_decay": t.weight_decay},
         {"params": [p for p in model.parameters() if p.requires_grad and p.ndim < 2], "weight_decay": 0.0}], lr=t.lr)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    state = state or {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "planned_steps": t.max_steps,
                      "loss_curve": [], "eval_curve": []}
    if state["step"]:
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resuming {out_dir} at step {state['step']}")
    if state["step"] == 0:
        state["eval_curve"].append({"step": 0, "mlm_loss": _eval_loss(model, input_ids[eval_idx], word_ids[eval_idx], cfg,
                                                                      tokenizer, random_ids, accelerator)})

    device = accelerator.device
    timer = StepTimer(device, warmup_steps=min(t.timing_warmup_steps, max(t.max_steps // 2, 0)))
    reset_peak_memory(device)
    progress = tqdm(total=t.max_steps, initial=state["step"], desc="pretrain", disable=not accelerator.is_local_main_process)
    loss_sum, loss_count = torch.zeros((), device=device), 0
    session_start = time.perf_counter()
    done = state["step"] >= state["planned_steps"]
    while not done:
        sampler.set_epoch(state["epoch"])
        loader = accelerator.skip_first_batches(train_dl, state["batch_in_epoch"]) if state["batch_in_epoch"] else train_dl
        for ids, words in loader:
            micro = state["epoch"] * len(train_dl) + state["batch_in_epoch"]
            state["batch_in_epoch"] += 1
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + micro * 101 + accelerator.process_index)
            inputs, labels = mask_tokens(ids, words, cfg.mask.probability, tokenizer.mask_token_id, random_ids, gen)
            timer.count(len(ids), ids.numel())
            with accelerator.accumulate(model):
                loss = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                _set_lr(optimizer, t, state["step"], state["planned_steps"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            timer.optimizer_step(state["step"])
            progress.update(1)
            step = state["step"]
            if step % t.log_every == 0 or step >= state["planned_steps"]:
                mean = accelerator.reduce(loss_sum / loss_count, "mean").item()
                if not math.isfinite(mean):
                    raise FloatingPointError(f"MLM loss is {mean} at step {step}")
                state["loss_curve"].append({"step": step, "mlm_loss": mean})
                progress.set_postfix(loss=f"{mean:.3f}")
                loss_sum.zero_()
                loss_count = 0
                if t.max_minutes > 0:
                    elapsed = state["train_seconds"] + time.perf_counter() - session_start
                    planned = min(t.max_steps, max(step, int(step * t.max_minutes * 60 / elapsed)))
                    state["planned_steps"] = int(broadcast(torch.tensor([planned], device=device)).item())
            if step % t.eval_every == 0 or step >= state["planned_steps"]:
                timer.pause()
                state["eval_curve"].append({"step": step, "mlm_loss": _eval_loss(
                    model, input_ids[eval_idx], word_ids[eval_idx], cfg, tokenizer, random_ids, accelerator)})
                timer.resume()
            if step % t.save_every == 0 and step < state["planned_steps"]:
                timer.pause()
                state["train_seconds"] += time.perf_counter() - session_start
                session_start = time.perf_counter()
                save_checkpoint(accelerator, state, cfg, ckpt)
                timer.resume()
            if step >= state["planned_steps"]:
                done = True
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    state["train_seconds"] += time.perf_counter() - session_start
    timing, memory = timer.result(), peak_memory_mb(device)

    totals = accelerator.reduce(torch.tensor([timing["timed_samples"], timing["timed_tokens"]], dtype=torch.float64,
                                             device=device), "sum").tolist()
    peaks = accelerator.gather(torch.tensor([memory["peak_memory_mb"]], dtype=torch.float64, device=device)).tolist()
    seconds = timing["timed_seconds"]
    metrics = {
        "mlm_loss": state["eval_curve"][-1]["mlm_loss"],
        "mlm_perplexity": math.exp(min(state["eval_curve"][-1]["mlm_loss"], 50)),
        "train_mlm_loss": state["loss_curve"][-1]["mlm_loss"] if state["loss_curve"] else float("nan"),
        "steps": state["step"], "stopped_by": "time" if state["step"] < t.max_steps else "max_steps", "train_seconds": state["train_seconds"],
        "train_samples_per_s": totals[0] / seconds if seconds else float("nan"),
        "train_tokens_per_s": totals[1] / seconds if seconds else float("nan"),
        "peak_memory_mb": max(peaks), "peak_memory_mb_per_process": peaks, "memory_kind": memory["memory_kind"],
        "wall_s": time.perf_counter() - start,
    }
    raw = accelerator.unwrap_model(model)
    params = {"trainable": sum(p.numel() for p in raw.parameters() if p.requires_grad),
              "total": sum(p.numel() for p in raw.parameters()), "vocab_size": len(tokenizer)}
    data = {"files": cfg.corpus.files, "documents": len(docs), "characters": sum(map(len, docs)),
            "train_blocks": len(train_idx), "eval_blocks": n_eval, "block_size": cfg.mask.block_size,
            "epochs_seen": (state["step"] * t.batch_size * t.grad_accum_steps * accelerator.num_processes) / len(train_idx)}
    record = make_record("success", cfg.to_dict(), cfg.run_id, env, metrics, params,
                         extra={"kind": "pretrain", "data": data, "loss_curve": state["loss_curve"],
                                "eval_curve": state["eval_curve"], "model_dir": str(out_dir / MODEL_DIR)})
    if accelerator.is_main_process:
        summary = {k: record[k] for k in ("run_id", "config", "env")} | {"metrics": metrics, "data": data}
        _save_model(raw, tokenizer, out_dir / MODEL_DIR, summary)
        write_atomic(out_dir / RECORD_NAME, record)
        shutil.rmtree(ckpt, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    return record


def _set_lr(optimizer, t: PretrainTrainConfig, step: int, planned: int) -> None:
    """Linear warm-up over ``warmup_ratio`` of the planned steps, then linear decay to 0 at the planned end."""
    warmup = max(1, int(t.warmup_ratio * planned))
    factor = (step + 1) / warmup if step < warmup else max(0.0, (planned - step) / max(1, planned - warmup))
    for group in optimizer.param_groups:
        group["lr"] = t.lr * factor


@torch.inference_mode()
def _eval_loss(model, input_ids, word_ids, cfg, tokenizer, random_ids, accelerator) -> float:
    """Mean MLM loss over the held-out blocks with fixed masks (the same every evaluation)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed + 7)
    total, count = 0.0, 0
    for s in range(0, len(input_ids), cfg.train.eval_batch_size):
        ids = input_ids[s : s + cfg.train.eval_batch_size].to(accelerator.device)
        inputs, labels = mask_tokens(ids, word_ids[s : s + cfg.train.eval_batch_size].to(accelerator.device),
                                     cfg.mask.probability, tokenizer.mask_token_id, random_ids, gen)
        n = int((labels != -100).sum())
        if n:
            with accelerator.autocast():
                total += model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss.float().item() * n
            count += n
    model.train()
    return total / max(count, 1)


def save_checkpoint(accelerator: Accelerator, state: dict, cfg: PretrainConfig, ckpt: Path) -> None:
    """Model, optimizer and RNG states plus the loop position, replaced as a whole (never half-written)."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_atomic(tmp / "loop_state.json", {**state, "run_id": cfg.run_id})
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)
    accelerator.wait_for_everyone()


def _resume_state(cfg: PretrainConfig, ckpt: Path) -> dict | None:
    path = ckpt / "loop_state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.pop("run_id") != cfg.run_id:
        raise PeftbenchError(f"{ckpt}: a checkpoint of a different configuration; use another output_dir "
                             "or delete the checkpoint")
    return state


def pretrained_by_peftbench(model_dir: str) -> dict | None:
    """The pretraining summary saved with a model directory, if peftbench made it."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return {"run_id": summary["run_id"], "corpus": summary["data"]["files"], "steps": summary["metrics"]["steps"],
            "mlm_loss": summary["metrics"]["mlm_loss"], "device": summary["env"].get("device_name")}

