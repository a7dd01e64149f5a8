"""Task registry and the one loader that turns task files into ``datasets`` splits.

A task is a :class:`TaskSpec`: its label list and a ``convert`` function that turns
one raw record (a JSON line, a CSV row or a hub row) into an :class:`Example`.
Every split comes out with the same columns: ``text_a``, ``text_b`` ("" for single
sentences), ``label`` (class index, -1 when the split is unlabeled) and ``id``;
token-classification tasks (``tasks.ner``) add ``entities``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from peftbench.errors import PeftbenchError, clip, where
from peftbench.registry import TASKS
from peftbench.tasks.kinds import CLASSIFICATION, TaskKind

if TYPE_CHECKING:
    from datasets import Dataset

# File names per layout: split -> candidates, first match wins.
LAYOUTS = {
    "clue": {"train": "train.json", "dev": "dev.json", "test": "test.json"},
    "fewclue": {"train": "train_few_all.json", "dev": "dev_few_all.json", "test": "test_public.json"},
    "csv": {"train": "train.csv", "dev": "dev.csv", "test": "test.csv"},
    "conll": {"train": "train.txt", "dev": "dev.txt", "test": "test.txt"},  # token classification: 'char TAG' lines
}
# Evaluation files of every layout, plus FewCLUE's per-split dev/test files (never pretraining text).
EVALUATION_FILE = re.compile("|".join([re.escape(names[s]) for names in LAYOUTS.values() for s in ("dev", "test")]
                                      + [r"dev_\d+\.json", r"test_public\.json"]))
log = logging.getLogger("peftbench")
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass
class Example:
    text_a: str
    text_b: str = ""
    label: str | None = None  # the label as a string; None = unlabeled
    id: int | None = None
    entities: list | None = None  # token classification: gold spans (tasks.ner.Span)
    overlaps: list | None = None  # token classification: (dropped, kept) overlapping spans


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    labels: tuple[str, ...]  # label strings as they appear in the data; list index = class id
    convert: Callable[[dict], Example]  # raises KeyError(field) for a missing field
    label_names: tuple[str, ...] | None = None  # human-readable names, if the labels are codes
    hub: tuple[str, str] | None = None  # load_dataset(*hub) when no data_dir is given
    skip_labels: tuple[str, ...] = ()  # labels meaning "no gold label": dropped and counted
    label_key: str = "label"  # the label's field name in the files
    kind: TaskKind = CLASSIFICATION  # or TOKEN_CLASSIFICATION (labels are then the tags)
    entity_types: tuple[str, ...] = ()  # token classification
    tag_scheme: str = "bio"  # token classification: how spans become tags
    generate: Callable[[], dict[str, list[dict]]] | None = None  # split -> records, when no data_dir is given
    version: int = 1  # bumped when what the loader produces from the same files changes (docs/tasks.md)

    def model_labels(self) -> list[str]:
        """What a model's ``config.id2label`` holds: the label names (``体育``), or the data's codes (``103``, kept
        in ``peftbench.json`` for submission files) when the task has no distinct names."""
        names = list(self.label_names or self.labels)
        return names if len(set(names)) == len(names) else list(self.labels)


def _dataset(columns: dict):
    from datasets import Dataset  # imported where used: `peftbench tasks` needs no datasets

    return Dataset.from_dict(columns)


@dataclass
class TaskData:
    spec: TaskSpec
    splits: dict[str, Dataset]
    source: str
    dropped: dict[str, int] = field(default_factory=dict)
    overlapping_entities: dict[str, int] = field(default_factory=dict)  # token classification
    lines: dict[str, list[int]] = field(default_factory=dict)  # split -> the line of each record in its file
    files: dict[str, str] = field(default_factory=dict)  # split -> where its records come from
    fingerprints: dict[str, dict] = field(default_factory=dict)  # split -> what identifies the data read

    def labeled(self, split: str) -> bool:
        ds = self.splits.get(split)
        return ds is not None and len(ds) > 0 and min(ds["label"]) >= 0


def register_task(spec: TaskSpec | Callable[..., TaskSpec], name: str | None = None):
    """Register a spec, or a factory ``f(task_cfg) -> TaskSpec`` under ``name``."""
    return TASKS.register(name or spec.name, spec)


def task_names() -> list[str]:
    return TASKS.names()


def describe_task(name: str) -> str:
    """One line for ``peftbench tasks``."""
    entry = TASKS.get(name, "task.name")
    if not isinstance(entry, TaskSpec):
        return f"{name:<12}    * labels  local      {entry.__doc__.strip().splitlines()[0]}"
    source = "hub+local" if entry.hub else "local"
    return f"{name:<12} {len(entry.labels):>4} labels  {source:<9}  {entry.description}"


def get_spec(task_cfg) -> TaskSpec:
    entry = TASKS.get(task_cfg.name, "task.name")
    return entry if isinstance(entry, TaskSpec) else entry(task_cfg)


def load_task(task_cfg) -> TaskData:
    """Load train/dev(/test) for ``task_cfg`` from a local folder, the hub, or a generator."""
    spec = get_spec(task_cfg)
    if not spec.kind.labels_per_token and task_cfg.tag_scheme != "bio":
        raise PeftbenchError(f"config key 'task.tag_scheme' applies only to token classification, not '{spec.name}'")
    if task_cfg.data_dir is None and spec.generate is not None:
        generated = spec.generate()
        raw = {split: list(enumerate(rows, 1)) for split, rows in generated.items()}
        data = _build(spec, raw, "generated (seed 0)", task_cfg, source_of=lambda split: f"<{spec.name} {split}>")
        data.fingerprints = {split: {"generated": spec.name, "sha256": hashlib.sha256(json.dumps(
            rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()} for split, rows in generated.items()}
        return data
    if task_cfg.data_dir is None:
        return _load_hub(spec, task_cfg)
    return _load_dir(spec, Path(task_cfg.data_dir), task_cfg)


def is_evaluation_file(path: Path) -> bool:
    """Whether ``path`` is named like a task's dev or test file."""
    return EVALUATION_FILE.fullmatch(path.name) is not None


def find_files(data_dir: Path) -> dict[str, Path]:
    """The split files of a CLUE, FewCLUE or CSV layout in ``data_dir``."""
    if not data_dir.is_dir():
        raise PeftbenchError(f"{data_dir}: data directory not found (config key 'task.data_dir')")
    for names in LAYOUTS.values():
        if (data_dir / names["train"]).is_file():
            files = {split: data_dir / name for split, name in names.items() if (data_dir / name).is_file()}
            if "dev" not in files:
                raise PeftbenchError(f"{data_dir}: has {names['train']} but no {names['dev']}")
            return files
    expected = "; ".join(f"{n['train']} + {n['dev']}" for n in LAYOUTS.values())
    raise PeftbenchError(f"{data_dir}: no training file found (expected one of: {expected})")


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark; other bytes are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PeftbenchError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); save the file as "
                             "UTF-8") from None


def csv_rows(reader: csv.DictReader) -> Iterator[tuple[int, dict]]:
    """(line, row) of each record of ``reader``: the line it starts on, blank lines skipped as the reader skips
    them, a quoted value spanning several."""
    for row in reader:
        values = [v for value in row.values() for v in (value if isinstance(value, list) else [value])]
        yield reader.line_num - sum(v.count("\n") for v in values if isinstance(v, str)), row


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a JSON-lines, CSV or CoNLL file (numbered by physical line).

    JSON lines are split on ``\\n`` only: IFLYTEK text holds raw U+2028, which
    ``str.splitlines`` would treat as a line break. CRLF line ends are accepted.
    """
    if path.suffix == ".txt":
        from peftbench.tasks.ner import read_conll

        yield from read_conll(path)
        return
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        try:
            yield from csv_rows(reader)
        except csv.Error as exc:
            raise PeftbenchError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        return
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PeftbenchError(f"{where(path, lineno)}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise PeftbenchError(f"{where(path, lineno)}: expected a JSON object, got {type(record).__name__}")
        yield lineno, record


def _load_dir(spec: TaskSpec, data_dir: Path, task_cfg) -> TaskData:
    files = find_files(data_dir)
    _check_label_file(spec, data_dir / "labels.json")
    raw = {split: list(read_records(path)) for split, path in files.items()}
    data = _build(spec, raw, str(data_dir), task_cfg, source_of=lambda split: files[split])
    data.fingerprints = {split: {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                         for split, path in files.items()}
    return data


def _load_hub(spec: TaskSpec, task_cfg) -> TaskData:
    if spec.hub is None:
        raise PeftbenchError(f"task '{spec.name}' is not on the hub: set config key 'task.data_dir' to a local folder")
    from datasets import load_dataset

    try:
        hub = load_dataset(*spec.hub)
    except Exception as exc:  # offline, missing config, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PeftbenchError(f"task '{spec.name}': could not load {'/'.join(spec.hub)} from the hub ({first}); "
                             f"set 'task.data_dir' to a local folder") from None
    raw, fingerprints = {}, {}
    for split, hub_split in HUB_SPLITS.items():
        if hub_split not in hub:
            continue
        ds = hub[hub_split]
        fingerprints[split] = {"hub": "/".join(spec.hub), "split": hub_split, "fingerprint": ds._fingerprint}
        names = ds.features["label"].names if hasattr(ds.features.get("label"), "names") else None
        rows = []
        for i, row in enumerate(ds, 1):
            row = dict(row)
            if names is not None:
                row["label"] = None if row["label"] < 0 else names[row["label"]]
            rows.append((i, row))
        raw[split] = rows
    name = "hub:" + "/".join(spec.hub)
    data = _build(spec, raw, name, task_cfg, source_of=lambda split: f"{name}[{split}]")
    data.fingerprints = fingerprints  # datasets' fingerprint of each split: its builder, revision and files
    return data


def _check_label_file(spec: TaskSpec, path: Path) -> None:
    """A CLUE release's labels.json must not name labels the task does not know."""
    if not path.is_file():
        return
    for lineno, record in read_records(path):
        if "label" not in record:
            raise PeftbenchError(f"{where(path, lineno, 'label')} missing")
        if str(record["label"]) not in spec.labels:
            raise PeftbenchError(f"{where(path, lineno, 'label')}: label {clip(repr(record['label']))} is not a "
                                 f"label of task '{spec.name}'")


def _build(spec: TaskSpec, raw: dict[str, list[tuple[int, dict]]], source: str, task_cfg, source_of) -> TaskData:
    """Convert raw records into one Dataset per split: text_a, text_b, label (class index, -1 = unlabeled), id;
    token classification adds ``entities`` (gold spans) and ``label`` is 0 for a labeled record."""
    tokens = spec.kind.labels_per_token
    label_index = {label: i for i, label in enumerate(spec.labels)}
    splits, dropped, overlapping, lines = {}, {}, {}, {}
    for split, rows in raw.items():
        path = source_of(split)
        columns = {"text_a": [], "text_b": [], "label": [], "id": []} | ({"entities": []} if tokens else {})
        lines[split] = []
        n_dropped = n_unlabeled = n_overlaps = 0
        seen_ids = set()
        for lineno, record in rows:
            try:
                ex = spec.convert(record)
            except KeyError as exc:
                raise PeftbenchError(f"{where(path, lineno, exc.args[0])} missing") from None
            except (TypeError, ValueError) as exc:
                raise PeftbenchError(f"{where(path, lineno)}: {exc}") from None
            if ex.label in spec.skip_labels:
                n_dropped += 1
                continue
            if ex.label is None:
                if split != "test" and not tokens:
                    raise PeftbenchError(f"{where(path, lineno, spec.label_key)} missing")
                n_unlabeled += 1
                index = -1
            elif tokens:
                index = 0
            elif ex.label not in label_index:
                raise PeftbenchError(f"{where(path, lineno, spec.label_key)}: label {clip(repr(ex.label))} is not a "
                                     f"label of task '{spec.name}'")
            else:
                index = label_index[ex.label]
            for lost, kept in ex.overlaps or ():
                n_overlaps += 1
                log.warning("%s: entity %r [%d, %d] (%s) overlaps %r [%d, %d] (%s); kept the latter",
                            where(path, lineno, spec.label_key), ex.text_a[lost.start : lost.end + 1], lost.start,
                            lost.end, lost.type, ex.text_a[kept.start : kept.end + 1], kept.start, kept.end, kept.type)
            columns["text_a"].append(ex.text_a)
            columns["text_b"].append(ex.text_b)
            columns["label"].append(index)
            columns["id"].append(lineno if ex.id is None else int(ex.id))
            lines[split].append(lineno)
            if tokens:
                if columns["id"][-1] in seen_ids:
                    raise PeftbenchError(f"{where(path, lineno, 'id')}: id {columns['id'][-1]} repeats; "
                                         "token-classification records need unique ids")
                seen_ids.add(columns["id"][-1])
                columns["entities"].append([{"start": e.start, "end": e.end, "type": e.type} for e in ex.entities])
        labels = columns["label"]
        if tokens and 0 < n_unlabeled < len(labels):  # a record with no entity may lack its label field
            labels[:] = [0] * len(labels)
        elif 0 < n_unlabeled < len(labels):
            raise PeftbenchError(f"{path}: {n_unlabeled} of {len(labels)} records have no label; label all or none")
        if not labels:
            raise PeftbenchError(f"{path}: split '{split}' is empty" +
                                 (f" (all {n_dropped} carry a label that means 'no gold label')" if n_dropped else ""))
        if split != "test" and min(labels) < 0:
            raise PeftbenchError(f"{where(path, rows[0][0], spec.label_key)} missing")
        if split == "train" and task_cfg.max_train_samples is not None:
            columns = {k: v[: task_cfg.max_train_samples] for k, v in columns.items()}
            lines[split] = lines[split][: task_cfg.max_train_samples]
        splits[split] = _dataset(columns)
        if n_dropped:
            dropped[split] = n_dropped
        if n_overlaps:
            overlapping[split] = n_overlaps
    return TaskData(spec=spec, splits=splits, source=source, dropped=dropped, overlapping_entities=overlapping,
                    lines=lines, files={split: str(source_of(split)) for split in raw})


def text_field(record: dict, name: str) -> str:
    """Read a text field; a missing field raises KeyError(name), a non-string TypeError."""
    value = record[name]
    if not isinstance(value, str):
        raise TypeError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def label_field(record: dict, name: str = "label") -> str | None:
    """Read a label as a string (JSON ints and strings alike); None/"" = unlabeled."""
    value = record.get(name)
    return None if value is None or value == "" else str(value)


# Registration of the built-in tasks.
from peftbench.tasks import clue, custom, ner, synthetic  # noqa: E402,F401
