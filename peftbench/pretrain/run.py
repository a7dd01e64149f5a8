"""The pretraining run: the corpus masked and trained through the fine-tuning loop, resumable, its model
swapped in whole with its record."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from peftbench import checkpoint, distributed
from peftbench.data import LengthGroupedBatchSampler
from peftbench.errors import PeftbenchError
from peftbench.heartbeat import main_first, telling_failure, wait_for_main
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
from peftbench.pretrain.config import PretrainConfig
from peftbench.pretrain.corpus import pack, read_documents
from peftbench.pretrain.masking import mask_tokens
from peftbench.pretrain.model import VOCAB_FILE, load_model, load_tokenizer, run_vocab
from peftbench.pretrain.reference import compare_with_reference
from peftbench.records import (
    PRETRAIN_RECORD_NAME,
    RunPhase,
    environment,
    failed_record_on_error,
    holds_success,
    make_record,
    write_atomic,
)


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
    with telling_failure(accelerator):  # the others may be waiting for the main process's solo work
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
        wait_for_main(accelerator, "writing the pretrained model and its record")
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
    with main_first(accelerator, "reading the corpus and building the model"):
        docs = read_documents(cfg.corpus.files, cfg.corpus.text_fields, cfg.corpus.allow_eval_text)
        set_seed(t.seed)
        tokenizer = load_tokenizer(cfg, out_dir, docs, fresh=saved is None)
        model, params = load_model(cfg, tokenizer)
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
