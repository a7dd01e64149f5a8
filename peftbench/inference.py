"""Use a trained checkpoint: ``peftbench.load`` for apps, ``predict`` for ``peftbench predict``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from peftbench.config import resolve
from peftbench.data import Collator, encode, encode_tokens
from peftbench.errors import PeftbenchError
from peftbench.methods import get_method
from peftbench.models import from_pretrained
from peftbench.tasks import load_task
from peftbench.tasks.ner import clue_label, predicted_spans

META_FILE = "peftbench.json"


def read_meta(ckpt_dir: Path) -> dict:
    meta_path = ckpt_dir / META_FILE
    if not meta_path.is_file():
        raise PeftbenchError(f"{ckpt_dir}: not a peftbench checkpoint ({META_FILE} missing)")
    return json.loads(meta_path.read_text(encoding="utf-8"))


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu", merge: bool = False):
    """Rebuild a trained model from its checkpoint; returns (model, tokenizer, meta), model in eval mode.

    ``merge=True`` folds LoRA-style updates into the base weights (no extra latency).
    """
    ckpt_dir = Path(ckpt_dir)
    meta = read_meta(ckpt_dir)
    cfg = resolve(meta["config"])
    method = get_method(meta["method"])(cfg.method)
    base = None
    quantized = cfg.model.quantization != "none"
    if meta["base_model"] is not None:  # quantised as in training: the trained tensors were fitted to that base
        source = ckpt_dir / "base" if meta["base_model"] == "base" else meta["base_model"]
        gpu = torch.device(device)
        base = from_pretrained(source, cfg.model, meta["labels"], meta.get("kind", "classification"),
                               device_map={"": gpu.index or 0} if quantized and gpu.type == "cuda" else None)
    model = method.load(base, ckpt_dir)
    if merge:
        if not hasattr(model, "merge_and_unload"):
            raise PeftbenchError(f"method '{meta['method']}' has no weights to merge into the base model")
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
    return (model if quantized else model.to(device)).eval(), tokenizer, meta  # bitsandbytes weights stay put


@torch.inference_mode()
def predict(ckpt_dir: str | Path, split: str, data_dir: str | None, out: str | Path, fmt: str = "jsonl",
            batch_size: int = 128, device: str = "cpu") -> Path:
    """Predict a split of the checkpoint's task and write one JSON line per record, in file order.

    Classification: ``{"id", "label", "label_name", "score"}``; token classification:
    ``{"id", "text", "entities": [{"start", "end", "type", "text"}]}`` (``end`` inclusive).
    ``fmt="clue"`` writes CLUE's submission format, ``{"id": ..., "label": "<label>"}`` or, for
    NER, ``{"id": ..., "label": {TYPE: {ENTITY: [[start, end]]}}}``, to ``<task>_predict.json``
    (inside ``out`` if it is a directory).
    """
    model, tokenizer, meta = load(ckpt_dir, device)
    cfg = resolve(meta["config"])
    if data_dir is not None:
        cfg.task.data_dir = data_dir
    cfg.task.max_train_samples = None
    data = load_task(cfg.task)
    if split not in data.splits:
        raise PeftbenchError(f"{data.source}: no '{split}' split to predict")
    ds = data.splits[split]
    tokens = data.spec.kind == "token_classification"
    encoded = (encode_tokens(ds, tokenizer, meta["max_length"], data.spec.labels, cfg.task.tag_scheme) if tokens
               else encode(ds, tokenizer, meta["max_length"], meta["pair"]))
    texts = dict(zip(ds["id"], ds["text_a"]))
    collator = Collator(tokenizer.pad_token_id)
    rows = []
    for start in range(0, len(encoded), batch_size):
        batch = collator([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        ids, index = batch.pop("id").tolist(), batch.pop("char_index", None)
        labels = batch.pop("labels")
        batch.pop("num_tokens")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        if tokens:
            preds = logits[:, -labels.shape[1]:].argmax(-1)  # prompt tuning prepends virtual-token outputs
            for record_id, p, c in zip(ids, preds.tolist(), index.tolist()):
                text = texts[record_id]
                spans = predicted_spans(p, c, len(text), data.spec.labels)
                rows.append({"id": record_id, "text": text, "entities": [
                    {"start": s.start, "end": s.end, "type": s.type, "text": text[s.start : s.end + 1]} for s in spans],
                    "label": clue_label(spans, text)})
            continue
        probs = logits.softmax(-1)
        for record_id, p in zip(ids, probs):
            k = int(p.argmax())
            rows.append({"id": record_id, "label": meta["labels"][k], "label_name": meta["label_names"][k],
                         "score": round(float(p[k]), 6)})
    as_dir = str(out).endswith("/") or Path(out).is_dir()
    out = Path(out)
    if fmt == "clue":
        rows = [{"id": r["id"], "label": r["label"]} for r in rows]
        if as_dir:
            out = out / f"{meta['task']}_predict.json"
    elif tokens:
        rows = [{k: v for k, v in r.items() if k != "label"} for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out
