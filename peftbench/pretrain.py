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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from peftbench import checkpoint, distributed
from peftbench import config as config_lib
from peftbench.data import LengthGroupedBatchSampler
from peftbench.errors import PeftbenchError, clip, where
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
from peftbench.methods import RunContext, get_method, set_trainable
from peftbench.models import build_char_vocab
from peftbench.noise import quiet_loading
from peftbench.records import (
    PRETRAIN_RECORD_NAME,
    RunPhase,
    environment,
    failed_record_on_error,
    holds_success,
    make_record,
    write_atomic,
    write_text_atomic,
)
from peftbench.tasks import is_evaluation_file, read_records


@dataclass
class CorpusConfig:
    files: list[str] = field(default_factory=list)  # JSON lines (.json/.jsonl) or plain text (one document per line)
    # JSON: each of these fields present in a record is a document
    # JSON lines: every listed field a record has is one document
    text_fields: list[str] = field(default_factory=lambda: ["sentence", "content", "text"])
    eval_fraction: float = 0.01  # held-out blocks for the MLM loss
    allow_eval_text: bool = False  # permit files named like a task's dev/test file


@dataclass
class PretrainModelConfig:
    name_or_path: str | None = None  # continued pretraining from a hub name or local directory
    from_scratch: bool = False  # build from ``architecture`` with a char vocabulary made from the corpus
    model_type: str = "bert"  # from scratch: the architecture (a transformers model type)
    architecture: dict = field(default_factory=dict)  # config overrides, e.g. hidden_size, num_hidden_layers
    vocab_min_freq: int = 2  # from scratch: keep characters seen at least this often
    lora_r: int = 0  # > 0: continued pretraining trains LoRA adapters, merged into the saved model
    # modules LoRA adapts when lora_r > 0
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])


@dataclass
class MaskConfig:
    block_size: int = 128  # tokens per block
    probability: float = 0.15  # share of the (non-special) tokens, or words, masked
    whole_word: bool = False  # mask whole words (Chinese: segmented with jieba)


@dataclass
class PretrainTrainConfig(config_lib.LoopConfig):
    max_steps: int = 1000  # optimizer steps
    max_minutes: float = 0.0  # > 0: also stop after this much training time; the LR schedule follows the budget
    batch_size: int = 64  # blocks per process and micro-batch
    lr: float = 5e-4  # peak learning rate
    warmup_ratio: float = 0.06  # share of steps spent warming up the learning rate
    log_every: int = 20  # optimizer steps between loss reads and time-budget checks
    eval_every: int = 200  # optimizer steps between held-out MLM losses
    save_every: int = 200  # optimizer steps between resumable checkpoints
    timing_warmup_steps: int = 3  # optimizer steps left out of throughput


@dataclass
class PretrainConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)
    output_dir: str = "runs/pretrain"  # model/ (the result), pretrain_record.json, checkpoint/ while running
    # a backbone folder this recipe rebuilds (the committed zh-mini): at the end, whether model/ matches it
    reference: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def run_id(self) -> str:
        body = self.to_dict()
        body.pop("output_dir")
        body.pop("reference")  # what the result is compared with, not what makes it
        for key in ("report_to", "dist_timeout"):  # how the run is watched or waits changes no result
            body["train"].pop(key)
        config_lib.drop_defaults(body, PretrainConfig().to_dict(), config_lib.LATER_KEYS)  # ids of older runs
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_config(recipe: str | None, overrides: list[str]) -> PretrainConfig:
    """The recipe with its overrides, checked; a bad value the recipe file sets is named with its line."""
    given = config_lib.parse_overrides(overrides)
    tree = config_lib.merge(config_lib.read_recipe(recipe) if recipe else {}, given)
    try:
        return _checked(config_lib.build(PretrainConfig, tree, ""))
    except PeftbenchError as exc:
        raise config_lib.located(exc, recipe, given) from None


def _checked(cfg: PretrainConfig) -> PretrainConfig:
    if not cfg.corpus.files:
        raise PeftbenchError("config key 'corpus.files': give at least one text file")
    if cfg.model.from_scratch == (cfg.model.name_or_path is not None):
        raise PeftbenchError("config keys 'model.name_or_path' / 'model.from_scratch': set exactly one")
    if cfg.model.from_scratch and cfg.model.lora_r:
        raise PeftbenchError("config key 'model.lora_r': LoRA needs pretrained weights (not model.from_scratch)")
    config_lib.check_loop(cfg.train)
    config_lib.require(cfg.train.max_steps >= 1, "train.max_steps", ">= 1", cfg.train.max_steps)
    for key in ("eval_every", "save_every"):
        config_lib.require(getattr(cfg.train, key) >= 1, f"train.{key}", ">= 1", getattr(cfg.train, key))
    config_lib.require(config_lib.finite(cfg.train.max_minutes) and cfg.train.max_minutes >= 0, "train.max_minutes",
                       "a finite number >= 0 (0: no time limit)", cfg.train.max_minutes)
    if not 0 < cfg.mask.probability < 1:
        raise PeftbenchError(f"config key 'mask.probability' must be in (0, 1), got {cfg.mask.probability}")
    if cfg.mask.block_size < 8:
        raise PeftbenchError(f"config key 'mask.block_size' must be >= 8, got {cfg.mask.block_size}")
    if not 0 < cfg.corpus.eval_fraction < 0.5:
        raise PeftbenchError(f"config key 'corpus.eval_fraction' must be in (0, 0.5), got {cfg.corpus.eval_fraction}")
    if cfg.reference is not None and not (Path(cfg.reference) / "config.json").is_file():
        raise PeftbenchError(f"config key 'reference': {clip(cfg.reference)} is not a model folder (no config.json)")
    return cfg


def compare_with_reference(model_dir: Path, reference: Path, mlm_loss: float) -> dict:
    """Whether a rebuilt backbone is the reference one: equal fingerprints (config, weights, tokenizer files);
    otherwise how far apart their weights lie (a rebuild on other hardware or library versions rounds
    differently) and their held-out MLM losses."""
    from safetensors.torch import load_file

    ours, theirs = (checkpoint.backbone_fingerprint(str(d), None, random_init=False) for d in (model_dir, reference))
    out = {"folder": str(reference), "fingerprint": theirs, "rebuilt_fingerprint": ours, "matches": ours == theirs,
           "mlm_loss": mlm_loss, "reference_mlm_loss": (checkpoint.pretrained_by_peftbench(str(reference)) or {}).get(
               "mlm_loss")}
    if not out["matches"]:
        weights = [{k: v for d in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(d)).items()}
                   for folder in (model_dir, reference)]
        same_shapes = weights[0].keys() == weights[1].keys() and all(
            weights[0][k].shape == weights[1][k].shape for k in weights[0])
        out["max_abs_weight_diff"] = max((float((weights[0][k].float() - weights[1][k].float()).abs().max())
                                          for k in weights[0]), default=0.0) if same_shapes else None
    return out


def describe_reference(ref: dict) -> str:
    """One line: the rebuild matches the reference, or how it differs."""
    if ref["matches"]:
        return f"rebuild matches {ref['folder']} (fingerprint {ref['fingerprint'][:12]})"
    diff = ("other tensor names or shapes" if ref["max_abs_weight_diff"] is None
            else f"max |weight difference| {ref['max_abs_weight_diff']:.2e}")
    loss = "" if ref["reference_mlm_loss"] is None else \
        f"; held-out MLM loss {ref['mlm_loss']:.4f} (reference {ref['reference_mlm_loss']:.4f})"
    return (f"rebuild differs from {ref['folder']}: fingerprint {ref['rebuilt_fingerprint'][:12]}, "
            f"reference {ref['fingerprint'][:12]}; {diff}{loss}")


# ---------------------------------------------------------------- corpus

def check_not_eval_text(path: Path, allow: bool) -> None:
    """Refuse a dev/test file of a task layout: pretraining on it leaks evaluation text into every score."""
    if is_evaluation_file(path) and not allow:
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
    if fresh:
        write_text_atomic(out_dir / VOCAB_FILE, "\n".join(build_char_vocab(docs, m.vocab_min_freq)) + "\n")
    return BertTokenizer(vocab=str(run_vocab(out_dir)), do_lower_case=True)


VOCAB_FILE = "pretrain_vocab.txt"  # a from-scratch run's vocabulary, beside its state until model/ holds it


def run_vocab(out_dir: Path) -> Path:
    """The vocabulary of the from-scratch run in ``out_dir`` (one interrupted before it was kept beside the state:
    in model/, which it had rewritten at its start)."""
    for path in (out_dir / VOCAB_FILE, out_dir / checkpoint.MODEL_DIR / "vocab.txt"):
        if path.is_file():
            return path
    raise PeftbenchError(f"{out_dir / VOCAB_FILE}: the vocabulary of the run to resume is missing; delete "
                         f"{out_dir / checkpoint.CHECKPOINT_DIR} to start over")


def _load_model(cfg: PretrainConfig, tokenizer):
    """The masked-LM model with its method applied: ``full`` (from scratch or continued), or ``lora``
    (continued pretraining of adapters, merged into the saved model). Returns (model, parameter counts)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    m = cfg.model
    if m.from_scratch:
        arch = {"max_position_embeddings": max(512, cfg.mask.block_size), **m.architecture}
        try:
            model_config = AutoConfig.for_model(m.model_type, vocab_size=len(tokenizer),
                                                pad_token_id=tokenizer.pad_token_id, **arch)
        except (ValueError, TypeError) as exc:
            raise PeftbenchError(f"config key 'model.architecture': {exc}") from None
        model = AutoModelForMaskedLM.from_config(model_config)
    else:
        try:
            with quiet_loading():  # fp32 master weights, whatever the files store
                model = AutoModelForMaskedLM.from_pretrained(m.name_or_path, dtype=torch.float32)
        except OSError as exc:
            raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{m.name_or_path}' ({exc})") from None
    method_cls = get_method("lora" if m.lora_r else "full")
    method_cfg = (method_cls.Config(r=m.lora_r, alpha=2 * m.lora_r, dropout=0.0, target_modules=m.lora_target_modules)
                  if m.lora_r else method_cls.Config())
    method = method_cls(method_cfg)
    model = method.apply(model, RunContext(total_steps=cfg.train.max_steps, num_labels=0, peft_task_type=None))
    return model, set_trainable(model, method)


# ---------------------------------------------------------------- recipe

def pretrain(cfg: PretrainConfig) -> dict:
    """Run (or resume) masked-LM pretraining; returns the record (also written to ``output_dir``).
    A crash writes a failed record, unless ``output_dir`` holds a successful run (its model and record stay until
    the new run is whole); an interrupt leaves the last resumable checkpoint."""
    launch = distributed.launch()
    if launch.sharded:
        raise PeftbenchError(f"peftbench pretrain runs in one process or under DDP, not under {launch.engine}: "
                             "launch it with recipes/accelerate/multi_gpu.yaml (or torchrun)")
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train, trackers_dir=out_dir / checkpoint.TRACKERS_DIR)
    env = environment(accelerator.num_processes)
    start_tracking(accelerator, cfg.run_id, cfg.to_dict(), out_dir.parent)
    keep = holds_success(out_dir, PRETRAIN_RECORD_NAME)  # the last whole run's, which model/ still holds
    try:
        with failed_record_on_error(out_dir / PRETRAIN_RECORD_NAME, cfg.to_dict(), cfg.run_id, env,
                                    accelerator.is_main_process and not keep, {"kind": "pretrain"}) as phase:
            record = _pretrain(cfg, accelerator, out_dir, env, phase)
    except Exception as exc:
        exc.kept_success = keep and not phase.published  # the command's error line says so
        raise
    finally:
        stop_tracking(accelerator)
    accelerator.wait_for_everyone()
    release(accelerator)
    return record


def _pretrain(cfg: PretrainConfig, accelerator, out_dir: Path, env: dict, phase: RunPhase) -> dict:
    t = cfg.train
    start = time.perf_counter()
    where = out_dir / checkpoint.CHECKPOINT_DIR
    ckpt = checkpoint.whole_state_dir(where)  # the last whole state, also when a kill came mid-swap
    if accelerator.is_main_process:
        checkpoint.restore_cut_swap(out_dir / checkpoint.MODEL_DIR)  # the last whole model, likewise
    saved = checkpoint.read_training_state(ckpt, cfg.run_id)  # (model/ and its record stay the last whole run's)
    with accelerator.main_process_first():
        docs = read_documents(cfg.corpus.files, cfg.corpus.text_fields, cfg.corpus.allow_eval_text)
        set_seed(t.seed)
        tokenizer = _load_tokenizer(cfg, out_dir, docs, fresh=saved is None)
        model, params = _load_model(cfg, tokenizer)
        input_ids, word_ids = pack(docs, tokenizer, cfg.mask.block_size, cfg.mask.whole_word)
    split = torch.randperm(len(input_ids), generator=torch.Generator().manual_seed(t.seed))
    n_eval = max(1, round(cfg.corpus.eval_fraction * len(input_ids)))
    eval_idx, train_idx = split[:n_eval], split[n_eval:]
    if len(train_idx) == 0:
        raise PeftbenchError(f"config key 'corpus.files': the corpus makes {len(input_ids)} block(s) of "
                             f"{cfg.mask.block_size} tokens, all held out for evaluation; pretraining needs more text")
    special = set(tokenizer.all_special_ids)
    random_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special])

    sampler = LengthGroupedBatchSampler([cfg.mask.block_size] * len(train_idx), t.batch_size, t.seed, False)
    blocks = torch.utils.data.TensorDataset(input_ids[train_idx], word_ids[train_idx])
    # Its own generator: creating an iterator then draws no number from the global RNG, which the resumed
    # run (a new iterator mid-epoch) would otherwise consume differently from the uninterrupted one.
    train_dl = DataLoader(blocks, batch_sampler=sampler, generator=torch.Generator(),
                          pin_memory=accelerator.device.type == "cuda")
    optimizer = build_optimizer(model, t)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)

    def eval_loss() -> float:
        return _eval_loss(model, input_ids[eval_idx], word_ids[eval_idx], cfg, tokenizer, random_ids, accelerator)

    if saved:
        eval_curve = saved.pop("eval_curve")
        saved.setdefault("lr_steps", saved["step"])  # states saved before the schedule counted skipped steps
        processes = saved.pop("processes", accelerator.num_processes)  # (states saved before it was recorded)
        if processes != accelerator.num_processes:  # each process's place in the epoch and masks follow the count
            raise PeftbenchError(f"{ckpt}: a training state of {processes} processes; resume it with as many (this "
                                 f"launch has {accelerator.num_processes})")
        state = LoopState(**saved)
        checkpoint.check_rng_state(ckpt, accelerator.process_index)
        accelerator.load_state(str(ckpt))
        accelerator.print(f"resuming {out_dir} at step {state.step}")
    else:
        state, eval_curve = LoopState(planned_steps=t.max_steps), [{"step": 0, "mlm_loss": eval_loss()}]

    def batches(epoch: int, skip: int):
        """The epoch's blocks after the first ``skip``, masked per micro-batch with a seed of its own (resumable)."""
        loader = accelerator.skip_first_batches(train_dl, skip) if skip else train_dl
        loader.set_epoch(epoch)  # an Accelerate loader sets its sampler's epoch from its own count of passes
        sampler.set_epoch(epoch)  # (several processes: the shard inside it does not)
        for micro, (ids, words) in enumerate(loader, epoch * len(train_dl) + skip):
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + micro * 101 + accelerator.process_index)
            inputs, labels = mask_tokens(ids, words, cfg.mask.probability, tokenizer.mask_token_id, random_ids, gen)
            yield {"inputs": {"input_ids": inputs, "attention_mask": torch.ones_like(inputs)}, "labels": labels,
                   "num_tokens": ids.numel()}

    def save(s: LoopState) -> None:
        checkpoint.save_training_state(accelerator, {**s.to_dict(), "eval_curve": eval_curve}, cfg.run_id, where)

    def on_eval(s: LoopState) -> None:
        eval_curve.append({"step": s.step, "mlm_loss": eval_loss()})
        accelerator.log({"eval/mlm_loss": eval_curve[-1]["mlm_loss"]}, step=s.step)

    hooks = Hooks(on_eval=on_eval, on_save=save)
    phase.training = True
    throughput = fit(accelerator, model, optimizer, batches, t, state, hooks,
                     [p for p in model.parameters() if p.requires_grad], eval_every=t.eval_every,
                     save_every=t.save_every, max_minutes=t.max_minutes, desc="pretrain")

    final = eval_curve[-1]["mlm_loss"]
    metrics = {
        "mlm_loss": final, "mlm_perplexity": math.exp(min(final, 50)),
        "train_mlm_loss": state.loss_curve[-1]["loss"] if state.loss_curve else float("nan"),
        "steps": state.step, "stopped_by": "time" if state.step < t.max_steps else "max_steps",
        "train_seconds": state.train_seconds, **throughput, "wall_s": time.perf_counter() - start,
    }
    accelerator.log({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=state.step)
    data = {"files": cfg.corpus.files, "documents": len(docs), "characters": sum(map(len, docs)),
            "train_blocks": len(train_idx), "eval_blocks": n_eval, "block_size": cfg.mask.block_size,
            "epochs_seen": state.step * t.batch_size * t.grad_accum_steps * accelerator.num_processes / len(train_idx)}
    record = make_record("success", cfg.to_dict(), cfg.run_id, env, metrics, {**params, "vocab_size": len(tokenizer)},
                         extra={"kind": "pretrain", "data": data, "loss_curve": state.loss_curve,
                                "eval_curve": eval_curve, "model_dir": str(out_dir / checkpoint.MODEL_DIR)})
    if accelerator.is_main_process:
        summary = {k: record[k] for k in ("run_id", "config", "env")} | {"metrics": metrics, "data": data}
        vocab = {"vocab.txt": run_vocab(out_dir)} if cfg.model.from_scratch else {}
        staged = checkpoint.stage_pretrained_model(accelerator.unwrap_model(model), tokenizer,
                                                   out_dir / checkpoint.MODEL_DIR, summary, vocab)
        if cfg.reference is not None:
            record["reference"] = compare_with_reference(staged, Path(cfg.reference), final)
        checkpoint.swap_in(staged, out_dir / checkpoint.MODEL_DIR)  # the model, then at once its record
        phase.published = True
        write_atomic(out_dir / PRETRAIN_RECORD_NAME, record)
        checkpoint.remove_state(where)
        (out_dir / VOCAB_FILE).unlink(missing_ok=True)  # model/ holds it now
    return record


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
                loss = model(input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss
                total += loss.float().item() * n
            count += n
    model.train()
    return total / max(count, 1)
