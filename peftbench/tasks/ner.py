"""Token classification (NER): CLUENER2020 and ``custom_ner``.

Gold entities are character spans ``(start, end, type)`` with ``end`` inclusive,
as CLUENER writes them. For training they become one tag per character (BIO, or
BIOES with ``task.tag_scheme=bioes``); the model sees each character as a word,
and a character's first token carries its tag (``kinds.TokenClassification.encode``).
Predictions go back to character spans with :func:`tags_to_spans`, and the
metric compares those spans with the gold spans, so any loss in alignment or
truncation counts as an error.

Bad spans (offsets outside the text, text that does not match the entity) are
errors naming the file, line and entity. Overlapping entities cannot be tagged
at once: the longer one is kept (the earlier on a tie), and each overlap is
reported with its file and line and counted in the record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from peftbench.errors import PeftbenchError, clip, where
from peftbench.tasks import Example, TaskSpec, register_task, text_field
from peftbench.tasks.kinds import TOKEN_CLASSIFICATION
from peftbench.tasks.spans import (  # noqa: F401  (re-exported)
    SCHEMES,
    Span,
    clue_label,
    predicted_spans,
    resolve_overlaps,
    spans_to_tags,
    tag_names,
    tags_to_spans,
)

CLUENER_TYPES = ("address", "book", "company", "game", "government", "movie", "name", "organization", "position",
                 "scene")


def read_span_label(text: str, label, types: tuple[str, ...], field: str = "label") -> list[Span]:
    """Spans of a CLUENER ``label`` object ``{TYPE: {ENTITY: [[start, end], ...]}}``, each checked against ``text``."""
    if label is None:
        return []
    if not isinstance(label, dict):
        raise TypeError(f"field '{field}' must be an object {{TYPE: {{ENTITY: [[start, end]]}}}}")
    spans = []
    for kind, entities in label.items():
        if kind not in types:
            raise ValueError(f"field '{field}': entity type {kind!r} is not one of {', '.join(types)}")
        if not isinstance(entities, dict):
            raise TypeError(f"field '{field}.{kind}' must map entity text to [[start, end], ...]")
        for entity, offsets in entities.items():
            if not isinstance(offsets, list):
                raise TypeError(f"field '{field}.{kind}': entity {entity!r}: offsets must be a list of [start, end]")
            for pair in offsets:
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) for x in pair)):
                    raise ValueError(f"field '{field}.{kind}': entity {entity!r}: offsets {pair!r} "
                                     "are not [start, end]")
                start, end = pair
                if not 0 <= start <= end < len(text):
                    raise ValueError(f"field '{field}.{kind}': entity {entity!r} at [{start}, {end}] is outside "
                                     f"the text ({len(text)} characters)")
                if text[start : end + 1] != entity:
                    raise ValueError(f"field '{field}.{kind}': entity {entity!r} at [{start}, {end}] does not match "
                                     f"the text there, {text[start : end + 1]!r}")
                spans.append(Span(start, end, kind))
    return spans


def span_converter(types: tuple[str, ...], text_key: str = "text", label_key: str = "label"):
    """Record -> Example with ``entities`` (overlaps resolved, reported in ``Example.overlaps``)."""

    def convert(record: dict) -> Example:
        text = text_field(record, text_key)
        spans, overlaps = resolve_overlaps(read_span_label(text, record.get(label_key), types, label_key))
        record_id = record.get("id")
        return Example(text, label=None if label_key not in record else "",
                       id=record_id if isinstance(record_id, int) else None,
                       entities=spans, overlaps=overlaps)

    return convert


WHITESPACE_TOKEN = re.compile(r"(\s)[ \t]+(\S+)[ \t\r]*")  # a token that is itself a space, then its tag


def read_conll(path: Path) -> Iterator[tuple[int, dict]]:
    """Sentences of a CoNLL-style file (``char TAG`` per line, blank line between sentences) as
    CLUENER-style records ``{"text", "label"}``, numbered by their first line. Lines without a
    tag give unlabeled records (a test file)."""
    from peftbench.tasks import read_text

    lines = list(enumerate(read_text(path).split("\n"), 1))
    sentence: list[tuple[int, list[str]]] = []
    tagged: bool | None = None  # whether the file's sentences carry tags (a test file's do not)
    for lineno, line in lines + [(len(lines) + 1, "")]:
        parts = line.split()
        if len(parts) == 1 and (spaced := WHITESPACE_TOKEN.fullmatch(line)):  # a full-width space, tagged
            parts = list(spaced.groups())
        if parts:
            if len(parts) > 2:
                raise PeftbenchError(f"{where(path, lineno)}: expected 'char TAG', got {clip(repr(line.strip()))}")
            sentence.append((lineno, parts))
            continue
        if not sentence:
            continue
        text = "".join(p[0] for _, p in sentence)
        record: dict = {"text": text}
        if all(len(p) == 2 for _, p in sentence):
            tags = []
            for n, (token, tag) in sentence:
                if tag != "O" and (tag[:2] not in ("B-", "I-", "E-", "S-") or len(tag) < 3):
                    raise PeftbenchError(f"{where(path, n)}: tag {clip(repr(tag))} is not O or B-/I-/E-/S-TYPE")
                tags += _char_tags(tag, len(token))
            record["label"] = clue_label(tags_to_spans(tags), text)
        elif any(len(p) == 2 for _, p in sentence):
            odd = next(n for n, p in sentence if len(p) != len(sentence[0][1]))
            raise PeftbenchError(f"{where(path, odd)}: some lines of this sentence have a tag, others not")
        if tagged is None:
            tagged = "label" in record
        elif tagged != ("label" in record):
            state = "has no tags, the ones before it do" if tagged else "has tags, the ones before it do not"
            raise PeftbenchError(f"{where(path, sentence[0][0])}: this sentence {state}; tag every line of a training "
                                 "or dev file, none of a test file")
        yield sentence[0][0], record
        sentence = []


def _char_tags(tag: str, n_chars: int) -> list[str]:
    """The tags of the characters of one CoNLL token (a token of several characters is one entity piece)."""
    if tag == "O" or n_chars == 1:
        return [tag] * n_chars
    prefix, kind = tag[0], tag[2:]
    first = "B" if prefix in "BS" else "I"
    last = "E" if prefix in "ES" else "I"
    return [f"{first}-{kind}"] + [f"I-{kind}"] * (n_chars - 2) + [f"{last}-{kind}"]


def cluener_spec(task_cfg) -> TaskSpec:
    """CLUENER2020 fine-grained NER, 10 entity types, entity-level F1 (set task.data_dir)."""
    return TaskSpec("cluener", "CLUENER2020 fine-grained NER (10 entity types, entity F1)",
                    tag_names(CLUENER_TYPES, scheme_of(task_cfg)), span_converter(CLUENER_TYPES),
                    kind=TOKEN_CLASSIFICATION, entity_types=CLUENER_TYPES, tag_scheme=scheme_of(task_cfg))


def custom_ner_spec(task_cfg) -> TaskSpec:
    """User NER data: spans as CLUENER JSON lines, or CoNLL 'char TAG' train/dev/test.txt (task.labels = types)."""
    types = task_cfg.labels
    if not types:
        raise PeftbenchError("config key 'task.labels' must list the entity types for task.name=custom_ner")
    if len(set(types)) != len(types):
        raise PeftbenchError("config key 'task.labels' has duplicate entity types")
    fields = task_cfg.text_fields or ["text"]
    if len(fields) != 1:
        raise PeftbenchError("config key 'task.text_fields' must name one text field for task.name=custom_ner")
    label_key = task_cfg.label_field or "label"
    return TaskSpec("custom_ner", "user NER data", tag_names(tuple(types), scheme_of(task_cfg)),
                    span_converter(tuple(types), fields[0], label_key), label_key=label_key,
                    kind=TOKEN_CLASSIFICATION, entity_types=tuple(types), tag_scheme=scheme_of(task_cfg))


def scheme_of(task_cfg) -> str:
    if task_cfg.tag_scheme not in SCHEMES:
        raise PeftbenchError(f"config key 'task.tag_scheme' must be one of {SCHEMES}, "
                             f"got {clip(repr(task_cfg.tag_scheme))}")
    return task_cfg.tag_scheme


register_task(cluener_spec, name="cluener")
register_task(custom_ner_spec, name="custom_ner")
