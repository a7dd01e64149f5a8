"""Task kinds: what differs between sequence and token classification, in one object each.

A kind owns the model class, PEFT's task type, how a split is tokenised, what an
evaluation step gathers, how predictions are scored, and what a prediction row
looks like. The loop, the recipes and the methods ask the kind; none of them
tests a kind's name.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, ClassVar

import torch

from peftbench.metrics import classification_metrics, entity_metrics
from peftbench.tasks.spans import Span, clue_label, predicted_spans, spans_to_tags

if TYPE_CHECKING:
    from datasets import Dataset


class TaskKind:
    name: ClassVar[str]  # stored in checkpoints and records
    metric: ClassVar[str]  # the headline score
    auto_class_name: ClassVar[str]  # transformers Auto* class
    peft_task_type: ClassVar[str]  # peft.TaskType value
    labels_per_token: ClassVar[bool]  # labels align with the input tokens (methods that prepend tokens pad them)

    @property
    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    def encode(self, ds: Dataset, tokenizer, spec, max_length: int, pair: bool) -> Dataset:
        """Tokenise a split: model inputs, ``labels``, ``id`` and ``length``."""
        raise NotImplementedError

    def tokenize(self, tokenizer, texts_a: list[str], texts_b: list[str] | None, max_length: int) -> dict:
        """Model inputs and ``length`` (and what maps predictions back to the text) for a batch of texts."""
        raise NotImplementedError

    def encode_texts(self, tokenizer, texts_a: list[str], texts_b: list[str] | None, max_length: int) -> list[dict]:
        """Examples for texts that come without a data file (a server's requests), tokenised as ``encode``
        does, with ``id`` = position and no labels (-100)."""
        enc = self.tokenize(tokenizer, texts_a, texts_b, max_length)
        examples = [{key: enc[key][i] for key in enc} for i in range(len(texts_a))]
        for i, ex in enumerate(examples):
            ex["id"] = i
            ex["labels"] = [-100] * len(ex["input_ids"]) if self.labels_per_token else -100
        return examples

    def gather(self, accelerator, logits: torch.Tensor, batch: dict) -> tuple:
        """What one evaluation batch contributes, gathered over processes (each sample once)."""
        raise NotImplementedError

    def score(self, rows: list[tuple], spec, ds: Dataset) -> tuple[dict, torch.Tensor, list]:
        """Metrics (with ``score`` and ``score_name``), record ids and predictions from gathered rows."""
        raise NotImplementedError

    def prediction_rows(self, logits: torch.Tensor, batch: dict, texts: dict, labels, label_names,
                        top_k: int | None = 0) -> list[dict]:
        """One output row per record of a predicted batch; ``top_k`` (classification): also the ``k`` most
        probable labels with their probabilities, sorted (None: every label; 0: only the top one)."""
        raise NotImplementedError

    def per_example(self, ids: torch.Tensor, preds: list, ds: Dataset) -> dict | None:
        """Each example's part of the headline score, in id order (what a paired bootstrap resamples):
        ``{"metric", "n", "ids_sha256", "values"}``; None where ids repeat (examples cannot be paired)."""
        raise NotImplementedError

    def baselines(self, ds: Dataset, spec) -> dict:
        """The headline score of guessing on this split: ``chance`` (uniformly random labels, expected) and
        ``majority`` (always the most frequent label); None where it has no meaning."""
        raise NotImplementedError

    def submission_row(self, row: dict) -> dict:
        """A row in CLUE's submission format: ``{"id", "label"}``."""
        return {"id": row["id"], "label": row["label"]}

    def jsonl_row(self, row: dict) -> dict:
        return row

    def _scored(self, metrics: dict) -> dict:
        return {**metrics, "score": metrics[self.metric], "score_name": self.metric}


class Classification(TaskKind):
    name = "classification"
    metric = "accuracy"
    auto_class_name = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    labels_per_token = False

    def tokenize(self, tokenizer, texts_a, texts_b, max_length):
        enc = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    def encode(self, ds, tokenizer, spec, max_length, pair):
        def tokenize(batch):
            return self.tokenize(tokenizer, batch["text_a"], batch["text_b"] if pair else None, max_length)

        ds = ds.map(tokenize, batched=True, remove_columns=["text_a", "text_b"])
        return ds.rename_column("label", "labels")

    def gather(self, accelerator, logits, batch):
        return accelerator.gather_for_metrics((batch["id"], logits.argmax(-1), batch["labels"]))

    def score(self, rows, spec, ds):
        ids = torch.cat([r[0].cpu() for r in rows])
        preds, golds = torch.cat([r[1].cpu() for r in rows]), torch.cat([r[2].cpu() for r in rows])
        return self._scored(classification_metrics(golds.tolist(), preds.tolist())), ids, preds.tolist()

    def per_example(self, ids, preds, ds):
        """``values``: one character per example, ``1`` where the prediction is right (accuracy: their mean)."""
        gold = dict(zip(ds["id"], ds["label"]))
        pairs = sorted(zip(ids.tolist(), preds))
        if len(gold) != len(ds) or len(pairs) != len(gold):
            return None
        return {"metric": self.metric, "n": len(pairs), "ids_sha256": _ids_digest([i for i, _ in pairs]),
                "values": "".join("1" if p == gold[i] else "0" for i, p in pairs)}

    def prediction_rows(self, logits, batch, texts, labels, label_names, top_k=0):
        probs = logits.float().softmax(-1).cpu()
        rows = []
        for record_id, p in zip(batch["id"].tolist(), probs):
            k = int(p.argmax())
            rows.append({"id": record_id, "label": labels[k], "label_name": label_names[k],
                         "score": round(float(p[k]), 6)})
            if top_k != 0:
                order = p.argsort(descending=True, stable=True)[:top_k].tolist()
                rows[-1]["top_k"] = [{"label": labels[j], "label_name": label_names[j],
                                      "score": round(float(p[j]), 6)} for j in order]
        return rows

    def baselines(self, ds, spec):
        labels = list(ds["label"])
        return {"chance": 1 / len(spec.labels), "majority": max(labels.count(k) for k in set(labels)) / len(labels)}


class TokenClassification(TaskKind):
    """Each character is a word; its first token carries its tag. Predictions go back to character spans."""

    name = "token_classification"
    metric = "entity_f1"
    auto_class_name = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"
    labels_per_token = True

    def encode(self, ds, tokenizer, spec, max_length, pair):
        """Later pieces of a character and special tokens get label -100 (ignored by the loss), and
        ``char_index`` maps each first piece back to its character (-1 elsewhere). Characters the
        tokenizer drops (spaces) or truncates get no prediction (``O``)."""
        tag_id = {tag: i for i, tag in enumerate(spec.labels)}

        def tokenize(batch):
            enc = self.tokenize(tokenizer, batch["text_a"], None, max_length)
            enc["labels"] = []
            for text, entities, index in zip(batch["text_a"], batch["entities"], enc["char_index"]):
                char_tags = spans_to_tags(len(text), [Span(e["start"], e["end"], e["type"]) for e in entities],
                                          spec.tag_scheme)
                enc["labels"].append([tag_id[char_tags[c]] if c >= 0 else -100 for c in index])
            return enc

        return ds.map(tokenize, batched=True, remove_columns=["text_a", "text_b", "label", "entities"])

    def tokenize(self, tokenizer, texts_a, texts_b, max_length):
        enc = tokenizer([list(text) for text in texts_a], is_split_into_words=True, truncation=True,
                        max_length=max_length)
        enc["char_index"] = []
        for i in range(len(texts_a)):
            word_ids = enc.word_ids(i)
            first = [w is not None and (j == 0 or word_ids[j - 1] != w) for j, w in enumerate(word_ids)]
            enc["char_index"].append([w if f else -1 for w, f in zip(word_ids, first)])
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    @staticmethod
    def _token_predictions(logits, labels):
        return logits[:, -labels.shape[1]:].argmax(-1)  # methods that prepend virtual tokens return longer outputs

    def gather(self, accelerator, logits, batch):
        labels, index = batch["labels"], batch["char_index"]
        preds = self._token_predictions(logits, labels)
        preds, labels, index = (accelerator.pad_across_processes(t, dim=1, pad_index=-100)
                                for t in (preds, labels, index))
        return accelerator.gather_for_metrics((batch["id"], preds, labels, index))

    def score(self, rows, spec, ds):
        ids = torch.cat([r[0].cpu() for r in rows])
        gold = {i: (len(text), [Span(e["start"], e["end"], e["type"]) for e in ents])
                for i, text, ents in zip(ds["id"], ds["text_a"], ds["entities"])}
        pred_rows, index_rows, correct, counted = [], [], 0, 0
        for _, preds, labels, index in rows:
            preds, labels, index = preds.cpu(), labels.cpu(), index.cpu()
            real = labels != -100
            correct += int((preds[real] == labels[real]).sum())
            counted += int(real.sum())
            pred_rows += preds.tolist()
            index_rows += index.tolist()
        pred_spans = [predicted_spans(p, c, gold[i][0], spec.labels)
                      for i, p, c in zip(ids.tolist(), pred_rows, index_rows)]
        metrics = entity_metrics([gold[i][1] for i in ids.tolist()], pred_spans, spec.entity_types)
        metrics["token_accuracy"] = correct / max(counted, 1)
        return self._scored(metrics), ids, pred_spans

    def per_example(self, ids, preds, ds):
        """``values``: per example ``[hits, predicted only, gold only]`` entity counts (entity F1 from their sums)."""
        gold = {i: {Span(e["start"], e["end"], e["type"]) for e in ents} for i, ents in zip(ds["id"], ds["entities"])}
        pairs = sorted(zip(ids.tolist(), preds), key=lambda pair: pair[0])
        if len(pairs) != len(gold):
            return None
        values = []
        for i, spans in pairs:
            hits = len(gold[i] & set(spans))
            values.append([hits, len(set(spans)) - hits, len(gold[i]) - hits])
        return {"metric": self.metric, "n": len(pairs), "ids_sha256": _ids_digest([i for i, _ in pairs]),
                "values": values}

    def prediction_rows(self, logits, batch, texts, labels, label_names, top_k=0):
        preds = self._token_predictions(logits, batch["labels"]).cpu()
        rows = []
        for record_id, p, c in zip(batch["id"].tolist(), preds.tolist(), batch["char_index"].tolist()):
            text = texts[record_id]
            spans = predicted_spans(p, c, len(text), labels)
            rows.append({"id": record_id, "text": text, "spans": spans, "entities": [
                {"start": s.start, "end": s.end, "type": s.type, "text": text[s.start : s.end + 1]} for s in spans]})
        return rows

    def baselines(self, ds, spec):
        return {"chance": None, "majority": 0.0}  # the majority tag is O everywhere: no entity, F1 0

    def submission_row(self, row):
        return {"id": row["id"], "label": clue_label(row["spans"], row["text"])}

    def jsonl_row(self, row):
        return {k: v for k, v in row.items() if k != "spans"}


CLASSIFICATION = Classification()
TOKEN_CLASSIFICATION = TokenClassification()
KINDS = {kind.name: kind for kind in (CLASSIFICATION, TOKEN_CLASSIFICATION)}


def _ids_digest(ids: list[int]) -> str:
    """Which examples, in which order: records whose digests agree can be compared example by example."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]
