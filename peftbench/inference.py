"""Use a trained checkpoint: ``peftbench.load`` for apps, ``predict`` for ``peftbench predict``, and
``serving_cost``, what serving a trained model costs (the record's ``inference``)."""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoTokenizer

from peftbench import checkpoint
from peftbench.config import resolve
from peftbench.data import Collator
from peftbench.errors import PeftbenchError, clip
from peftbench.measure import base_forward_flops, forward_flops, inference_cost, synchronize
from peftbench.methods import RunContext, get_method, lacked_modules
from peftbench.models import from_pretrained, guard_padding, merge_and_unload, without_peft
from peftbench.records import write_text_atomic
from peftbench.tasks import csv_rows, get_spec, load_task
from peftbench.tasks.kinds import KINDS


def load(ckpt_dir: str | Path, device: str | torch.device = "cpu", merge: bool = False, base: str | None = None):
    """Rebuild a trained model from its checkpoint; returns (model, tokenizer, meta), model in eval mode.

    ``base`` replaces the base model's recorded place (a hub name or a directory: the same model, moved); it
    is checked against the fingerprint taken at training. ``merge=True`` folds LoRA-style updates into the
    base weights (no extra latency); refused for a quantised base, which would quantise them again.
    """
    ckpt_dir = Path(ckpt_dir)
    with loading(ckpt_dir):
        return _load(ckpt_dir, open_checkpoint(ckpt_dir), device, merge, base)


@contextmanager
def loading(ckpt_dir: Path):
    """Report a failure to load ``ckpt_dir`` in one line naming it (a damaged or edited file that the checks of
    :func:`open_checkpoint` do not catch); ``PEFTBENCH_DEBUG=1`` shows the cause."""
    try:
        yield
    except PeftbenchError:
        raise
    except Exception as exc:
        text = str(exc).strip()
        raise PeftbenchError(f"{ckpt_dir}: cannot be loaded ({type(exc).__name__}: "
                             f"{clip(text.splitlines()[0] if text else '')})") from exc


def open_checkpoint(ckpt_dir: Path) -> dict:
    """A checkpoint's ``peftbench.json``, its files checked (:func:`checkpoint.read_meta`) and its labels checked
    against the task its config names: the one source of the label order that ``predict``, ``serve`` and
    ``export`` use. A label list edited by hand (reordered, cut) is refused, never served inverted."""
    meta = checkpoint.read_meta(ckpt_dir)
    path = ckpt_dir / checkpoint.META_FILE
    try:
        spec = get_spec(resolve(meta["config"]).task)
    except PeftbenchError as exc:
        raise PeftbenchError(f"{path}: field 'config': {exc}") from None
    expected = {"labels": list(spec.labels), "label_names": list(spec.label_names or spec.labels),
                "model_labels": spec.model_labels()}
    for field_name, want in expected.items():
        if meta[field_name] != want:
            raise PeftbenchError(f"{path}: field '{field_name}' is {clip(meta[field_name], 120)}, but task "
                                 f"'{spec.name}' has {clip(want, 120)}: the label list was edited; restore it")
    if meta["kind"] not in KINDS or KINDS[meta["kind"]] is not spec.kind:
        raise PeftbenchError(f"{path}: field 'kind' is {clip(repr(meta['kind']))}, but task '{spec.name}' is "
                             f"{spec.kind.name}")
    return meta


def _check_head(ckpt_dir: Path, meta: dict, model) -> None:
    """The model's own label names (a whole model's config.json) agree with the checkpoint's."""
    config = without_peft(model).config
    names = [config.id2label.get(i, config.id2label.get(str(i))) for i in range(config.num_labels)]
    if names != meta["model_labels"]:
        where = ckpt_dir / "config.json" if meta["base"] is None else ckpt_dir
        raise PeftbenchError(f"{where}: field 'id2label' is {clip(names, 120)}, but {checkpoint.META_FILE} has "
                             f"{clip(meta['model_labels'], 120)}: the labels were edited; restore them")


def _load(ckpt_dir: Path, meta: dict, device, merge: bool, base: str | None):
    cfg = resolve(meta["config"])
    kind = KINDS[meta["kind"]]
    method = get_method(meta["method"])(cfg.method)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir))
    if base is not None and meta["base"] is None:
        raise PeftbenchError(f"{ckpt_dir}: method '{meta['method']}' saved a whole model; it takes no base")
    quantized = cfg.model.quantization != "none"
    if merge and quantized:  # before the base is loaded
        raise PeftbenchError(f"{ckpt_dir}: trained on a {cfg.model.quantization} base; merging would quantise the "
                             "updated weights again, and the model would not be the one trained: load it unmerged")
    base_model = None if meta["base"] is None else load_base(ckpt_dir, meta, tokenizer.pad_token_id, device, base)
    ctx = RunContext(total_steps=0, num_labels=len(meta["labels"]), peft_task_type=kind.peft_task_type,
                     labels_per_token=kind.labels_per_token,
                     lacked_modules=lacked_modules(meta["base"]["new_weights"] if meta["base"] else ()))
    model = method.load(base_model, ckpt_dir, ctx)
    _check_head(ckpt_dir, meta, model)
    guard_padding(without_peft(model))
    if merge:
        if not (hasattr(model, "merge_and_unload") and method.makes_plain_model()):
            raise PeftbenchError(f"method '{meta['method']}' has no weights to merge into the base model")
        model = merge_and_unload(model)
    return (model if quantized else model.to(device)).eval(), tokenizer, meta  # bitsandbytes weights stay put


def load_base(ckpt_dir: Path, meta: dict, pad_id: int, device="cpu", base: str | None = None):
    """The pretrained base a checkpoint was trained on, as its task model (the weights its source lacked taken
    from the checkpoint), checked against the fingerprint taken at training; quantised as in training: the
    trained tensors were fitted to that base."""
    cfg, kind = resolve(meta["config"]), KINDS[meta["kind"]]
    source = base if base is not None else checkpoint.base_source(ckpt_dir, meta)
    gpu = torch.device(device)
    quantized = cfg.model.quantization != "none"
    base_model, _ = from_pretrained(source, cfg.model, meta["model_labels"], pad_id, kind.auto_class,
                                    device_map={"": gpu.index or 0} if quantized and gpu.type == "cuda" else None,
                                    float_storage=meta["base"].get("quant_storage") == "bf16")
    base_model.load_state_dict(checkpoint.read_new_weights(ckpt_dir), strict=False)
    checkpoint.check_base(ckpt_dir, meta, source, checkpoint.fingerprint(base_model))
    return base_model


def submission_file(name, ckpt_dir, data_file: str) -> str:
    """The file name a leaderboard expects for the predictions of task ``name`` (from checkpoint metadata: only
    a registered task's name becomes part of a file name): CLUE 1.1's versioned names, FewCLUE's when the
    data is in the FewCLUE layout, ``<task>_predict.json`` otherwise."""
    from peftbench.tasks import LAYOUTS, task_names
    from peftbench.tasks.clue import CLUE_SUBMISSION_FILES, FEWCLUE_SUBMISSION_FILES

    if not isinstance(name, str) or name not in task_names():
        raise PeftbenchError(f"{Path(ckpt_dir) / checkpoint.META_FILE}: field 'task': {name!r} is not a "
                             "registered task name")
    fewclue = Path(data_file).name in LAYOUTS["fewclue"].values()
    return (FEWCLUE_SUBMISSION_FILES if fewclue else CLUE_SUBMISSION_FILES).get(name, f"{name}_predict.json")


def check_unique_ids(ids: list[int], lines: list[int], source: str) -> None:
    """A submission file is matched by id: two records with one id would be scored against each other."""
    first = {}
    for record_id, line in zip(ids, lines):
        if record_id in first:
            raise PeftbenchError(f"{source}:{line}: field 'id': id {record_id} repeats line {first[record_id]}; "
                                 "a submission file needs unique ids")
        first[record_id] = line


class SplitBatches:
    """A split of a checkpoint's task, tokenised as in training and cut into padded batches in file order.
    ``split=None``: the split a run reports last, test when it is labeled, else dev."""

    def __init__(self, meta: dict, tokenizer, split: str | None, data_dir: str | None = None, batch_size: int = 128):
        cfg = resolve(meta["config"])
        cfg.task.data_dir = data_dir if data_dir is not None else meta["data_dir"]  # recorded as an absolute path
        cfg.task.max_train_samples = None
        self.data = load_task(cfg.task)
        if split is None:
            split = "test" if self.data.labeled("test") else "dev"
        if split not in self.data.splits:
            raise PeftbenchError(f"{self.data.source}: no '{split}' split to predict")
        self.split, self.kind, self.ds = split, self.data.spec.kind, self.data.splits[split]
        self.encoded = self.kind.encode(self.ds, tokenizer, self.data.spec, meta["max_length"], meta["pair"])
        self.collator, self.batch_size = Collator(tokenizer.pad_token_id), batch_size

    def __iter__(self):
        for start in range(0, len(self.encoded), self.batch_size):
            yield self.collator([self.encoded[i] for i in range(start, min(start + self.batch_size,
                                                                                  len(self.encoded)))])

    def labeled(self) -> bool:
        return self.data.labeled(self.split)

    def score(self, logits_per_batch: list[torch.Tensor]) -> dict:
        """The task's metrics (with ``score``) from one logits tensor per batch, in this object's batch order."""
        return self.scored(logits_per_batch)[0]

    def scored(self, logits_per_batch: list[torch.Tensor]) -> tuple[dict, torch.Tensor, list]:
        """The metrics, the record ids and the predictions (what a record's ``per_example`` is made of)."""
        rows = [self.kind.gather(ONE_PROCESS, logits, batch) for logits, batch in zip(logits_per_batch, self)]
        return self.kind.score(rows, self.data.spec, self.ds)


class _OneProcess:
    """What a task kind's ``gather`` asks of an Accelerator, for one process outside a launch."""

    @staticmethod
    def gather_for_metrics(tensors):
        return tensors

    @staticmethod
    def pad_across_processes(tensor, **_):
        return tensor


ONE_PROCESS = _OneProcess()


def read_texts(path: str, pair: bool) -> tuple[list[str], list[str] | None, list[int]]:
    """Texts to predict from ``path`` (``-``: standard input): CSV (``.csv``: a header with ``text``, or
    ``text_a`` and ``text_b``), JSON lines (``.json``/``.jsonl``: the same fields), plain text (any other file:
    one text a line; a pair task: the two texts separated by a tab); standard input is JSON lines when its
    first line starts with ``{``, CSV when its first line is a header naming those fields, else plain text.
    Empty lines are skipped. Returns (texts, their pairs or None, each text's line number)."""
    import csv
    import io
    import sys

    name = "<stdin>" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise PeftbenchError(f"{name}: cannot be read as UTF-8 text ({clip(exc)})") from None
    keys = ("text_a", "text_b") if pair else ("text",)
    lines = text.split("\n")  # not splitlines(): JSON text may hold U+2028 and other line separators
    first = next((line.strip() for line in lines if line.strip()), "")
    header = {field.strip() for field in first.split(",")}
    kind = ("csv" if name.endswith(".csv") else "jsonl" if name.endswith((".json", ".jsonl")) else "text") \
        if path != "-" else "jsonl" if first.startswith("{") else "csv" if {"text", "text_a"} & header and (
            "," in first or first in ("text", "text_a")) else "text"
    rows: list[tuple[int, dict]] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None:  # (reads the header)
            raise PeftbenchError(f"{name}: an empty CSV file, no header")
        try:
            rows = list(csv_rows(reader))
        except csv.Error as exc:
            raise PeftbenchError(f"{name}:{reader.line_num}: not valid CSV ({exc})") from None
    elif kind == "jsonl":
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PeftbenchError(f"{name}:{number}: not a JSON object ({exc.msg})") from None
                rows.append((number, row if isinstance(row, dict) else {}))
    else:
        for number, line in enumerate(lines, 1):
            if line.strip():
                parts = line.split("\t", 1) if pair else [line]
                rows.append((number, dict(zip(keys, parts))))
    if pair and rows and all("text" in row and "text_a" not in row for _, row in rows):
        raise PeftbenchError(f"{name}: this task classifies text pairs: give fields 'text_a' and 'text_b' (or, in "
                             "plain text, the two texts separated by a tab)")
    for number, row in rows:
        for key in keys:
            if not isinstance(row.get(key), str):
                raise PeftbenchError(f"{name}:{number}: field '{key}' missing or not text")
    if not rows:
        raise PeftbenchError(f"{name}: no text to predict")
    return ([row[keys[0]] for _, row in rows], [row["text_b"] for _, row in rows] if pair else None,
            [number for number, _ in rows])


@torch.inference_mode()
def predict(ckpt_dir: str | Path | list, split: str, data_dir: str | None, out: str | Path, fmt: str = "jsonl",
            batch_size: int = 128, device: str = "cpu", input_file: str | None = None,
            top_k: int | None = 0) -> Path:
    """Predict a split of the checkpoint's task and write one JSON line per record, in file order. Several
    checkpoints of one task (a list) predict as an ensemble: their probabilities averaged (:class:`Ensemble`).
    ``input_file`` (:func:`read_texts`) predicts its texts instead of a split: one line each, with ``id`` (its
    position) and ``line``. ``top_k``: classification rows also list the k most probable labels (None: all).

    Classification: ``{"id", "label", "label_name", "score"}``; token classification:
    ``{"id", "text", "entities": [{"start", "end", "type", "text"}]}`` (``end`` inclusive).
    ``fmt="clue"`` writes CLUE's submission format, ``{"id": ..., "label": "<label>"}`` or, for
    NER, ``{"id": ..., "label": {TYPE: {ENTITY: [[start, end]]}}}``, to the file name the leaderboard expects
    (:func:`submission_file`: e.g. ``tnews11_predict.json``; inside ``out`` if it is a directory).
    """
    ensemble = Ensemble(ckpt_dir if isinstance(ckpt_dir, list) else [ckpt_dir], device)
    ckpt_dir, meta = ensemble.ckpts[0], ensemble.meta
    if input_file is not None:
        if fmt == "clue":
            raise PeftbenchError("--format clue writes a task split's submission file; with --input, use jsonl")
        texts_a, texts_b, lines = read_texts(input_file, meta["pair"])
        kind, rows = KINDS[meta["kind"]], []
        for batch, logits in ensemble.texts_logits(texts_a, texts_b, batch_size):
            rows += kind.prediction_rows(logits, batch, dict(enumerate(texts_a)), meta["labels"],
                                         meta["label_names"], top_k)
        return _write_lines(Path(out), [{**kind.jsonl_row(r), "line": lines[r["id"]]} for r in rows])
    batches, logits = ensemble.split_logits(split, data_dir, batch_size)
    data, ds, kind = batches.data, batches.ds, batches.kind
    if fmt == "clue":
        check_unique_ids(ds["id"], data.lines[split], data.files[split])
    texts = dict(zip(ds["id"], ds["text_a"]))
    rows = []
    for part, batch in zip(logits, batches):
        rows += kind.prediction_rows(part, batch, texts, meta["labels"], meta["label_names"], top_k)
    as_dir = str(out).endswith("/") or Path(out).is_dir()
    out = Path(out)
    if fmt == "clue":
        rows = [kind.submission_row(r) for r in rows]
        if as_dir:
            out = out / submission_file(meta["task"], ckpt_dir, data.files[split])
    else:
        rows = [kind.jsonl_row(r) for r in rows]
    return _write_lines(out, rows)


def _write_lines(out: Path, rows: list[dict]) -> Path:
    """JSON lines, written whole or not at all."""
    return write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


class Ensemble:
    """Several checkpoints of one task whose predicted probabilities are averaged, example by example (token by
    token for NER). Members may differ in method and backbone; they must share the task, its labels and its
    kind, and for token classification also the tokenizer and ``max_length`` (their tokens must line up). One
    checkpoint is an ensemble of one: its own predictions."""

    def __init__(self, ckpts: list[str | Path], device: str = "cpu"):
        self.ckpts, self.device = [Path(c) for c in ckpts], device
        self.members = [load(c, device) for c in self.ckpts]  # (model, tokenizer, meta)
        self.meta = self.members[0][2]
        self.forward_seconds = 0.0  # the last split_logits' forward passes
        first = self.meta
        for ckpt, (_, tokenizer, meta) in zip(self.ckpts[1:], self.members[1:]):
            for key in ("task", "kind", "labels"):
                if meta[key] != first[key]:
                    raise PeftbenchError(f"{ckpt}: field '{key}' is {clip(repr(meta[key]), 80)}, but {self.ckpts[0]} "
                                         f"has {clip(repr(first[key]), 80)}: an ensemble's members predict one task")
            if KINDS[first["kind"]].labels_per_token and (
                    meta["max_length"] != first["max_length"]
                    or tokenizer.get_vocab() != self.members[0][1].get_vocab()):
                raise PeftbenchError(f"{ckpt}: another tokenizer or max_length than {self.ckpts[0]}: a token "
                                     "classification ensemble averages token by token, so its members share both")

    def texts_logits(self, texts_a: list[str], texts_b: list[str] | None, batch_size: int = 128):
        """(batch, log of the members' mean probabilities) for texts that come without a data file, in batches
        of the first member's tokenisation (ids: the texts' positions)."""
        kind = KINDS[self.meta["kind"]]
        for start in range(0, len(texts_a), batch_size):
            a, b = texts_a[start:start + batch_size], texts_b and texts_b[start:start + batch_size]
            mean, first = None, None
            for model, tokenizer, meta in self.members:
                examples = kind.encode_texts(tokenizer, a, b, meta["max_length"])
                batch = Collator(tokenizer.pad_token_id)([{**ex, "id": start + i} for i, ex in enumerate(examples)])
                first = first or batch
                probs = _token_aligned(model(**{k: v.to(self.device) for k, v in batch["inputs"].items()}).logits,
                                       batch).float().softmax(-1).cpu()
                mean = probs if mean is None else mean + probs
            yield first, (mean / len(self.members)).log()

    def split_logits(self, split: str | None, data_dir: str | None, batch_size: int = 128,
                     labeled_only: bool = False):
        """The first member's :class:`SplitBatches` of ``split`` (of ``data_dir``, else the first member's data
        for every member) and, per batch, the log of the members' mean probabilities (None when ``labeled_only``
        and the split has no labels). ``forward_seconds``: the members' forward passes took this long (reading
        and tokenising the split aside, as a run's evaluation times it)."""
        data_dir = data_dir if data_dir is not None else self.meta["data_dir"]
        splits = [SplitBatches(meta, tokenizer, split, data_dir, batch_size) for _, tokenizer, meta in self.members]
        if labeled_only and not splits[0].labeled():
            return splits[0], None
        mean = None
        synchronize(torch.device(self.device))
        start = time.perf_counter()
        for (model, _, _), batches in zip(self.members, splits):
            probs = [_token_aligned(model(**{k: v.to(self.device) for k, v in b["inputs"].items()}).logits, b)
                     .float().softmax(-1).cpu() for b in batches]
            mean = probs if mean is None else [m + p for m, p in zip(mean, probs)]
        synchronize(torch.device(self.device))
        self.forward_seconds = time.perf_counter() - start
        return splits[0], [(m / len(self.members)).log() for m in mean]


def _token_aligned(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Token logits cut to the batch's tokens (prompt and P-tuning put their virtual tokens first), so that
    members of a token classification ensemble line up; sequence logits as they are."""
    length = batch["inputs"]["input_ids"].shape[1]
    return logits[:, -length:] if logits.dim() == 3 and logits.shape[1] != length else logits


INFERENCE_BATCHES = 8  # throughput is timed over this many evaluation batches (or the whole split)


def serving_cost(model, method, split: str, examples, collator: Collator, auto_class, batch_size: int,
                 quantized: bool, accelerator) -> dict:
    """A trained model's serving cost (:func:`measure.inference_cost`) on ``examples`` of ``split``: as trained
    and, for a method that merges into the base weights (float base), merged, on a copy. Batches in file order
    (traffic is not sorted by length); the single sequence is the median-length example. Run on one process:
    a sharded model (FSDP2, DeepSpeed) runs only with all its processes, and is not measured."""
    batches = [collator([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
               for start in range(0, min(len(examples), INFERENCE_BATCHES * batch_size), batch_size)]
    lengths = list(examples["length"])
    single = collator([examples[sorted(range(len(lengths)), key=lengths.__getitem__)[len(lengths) // 2]]])
    was_training = model.training
    model.eval()
    cost = {"split": split, "as_trained": inference_cost(model, single, batches, accelerator.device,
                                                          autocast=accelerator.autocast)}
    merged = None
    if hasattr(model, "merge_and_unload") and method.makes_plain_model() and not quantized:
        merged = merge_and_unload(copy.deepcopy(model))
        cost["merged"] = inference_cost(merged, single, batches, accelerator.device, autocast=accelerator.autocast)
    served = model if merged is None else merged  # what a deployment runs: merged where it can be
    inputs = {k: v.to(accelerator.device) for k, v in single["inputs"].items()}
    with accelerator.autocast():
        cost["flops_per_sample"] = forward_flops(served, inputs)
    cost["base_flops_per_sample"] = base_forward_flops(auto_class, without_peft(served).config, inputs["input_ids"])
    cost["flops_length"] = int(inputs["input_ids"].shape[1])
    del merged, served
    model.train(was_training)
    return cost
