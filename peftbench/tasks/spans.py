"""Entity spans and tag sequences (BIO, BIOES) for token classification.

A span is ``(start, end, type)`` over characters, ``end`` inclusive, as CLUENER writes it.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("bio", "bioes")


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # inclusive
    type: str


def tag_names(types: tuple[str, ...], scheme: str) -> tuple[str, ...]:
    """``O`` then, per type, its prefixed tags: B, I (BIO) or B, I, E, S (BIOES)."""
    prefixes = "BI" if scheme == "bio" else "BIES"
    return ("O",) + tuple(f"{p}-{t}" for t in types for p in prefixes)


def spans_to_tags(n_chars: int, spans: list[Span], scheme: str) -> list[str]:
    """One tag per character. Spans must not overlap."""
    tags = ["O"] * n_chars
    for s in spans:
        if scheme == "bioes" and s.start == s.end:
            tags[s.start] = f"S-{s.type}"
            continue
        tags[s.start] = f"B-{s.type}"
        for i in range(s.start + 1, s.end + 1):
            tags[i] = f"I-{s.type}"
        if scheme == "bioes":
            tags[s.end] = f"E-{s.type}"
    return tags


def tags_to_spans(tags: list[str]) -> list[Span]:
    """Entity spans of a BIO or BIOES tag sequence.

    Read as conlleval reads it: an ``I-``/``E-`` tag continues an open entity of the same
    type and otherwise starts a new one; ``B-``/``S-`` always start one; ``E-``/``S-`` close it.
    """
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, _, t = tag.partition("-")
        continues = start is not None and t == kind and prefix in ("I", "E")
        if start is not None and not continues:
            spans.append(Span(start, i - 1, kind))
            start = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and not continues):
            start, kind = i, t
        if prefix in ("E", "S") and start is not None:
            spans.append(Span(start, i, kind))
            start = None
    return spans


def predicted_spans(pred: list[int], char_index: list[int], n_chars: int, tags: tuple[str, ...]) -> list[Span]:
    """Spans from per-token predictions: each character takes its first token's tag.

    A character without a token (a space) inside an entity, between a tag of type X and a
    following ``I-X``/``E-X``, continues it; elsewhere it is ``O``.
    """
    char_tags: list[str | None] = [None] * n_chars
    for p, c in zip(pred, char_index):
        if c >= 0:
            char_tags[c] = tags[p]
    before, last = [], "O"  # the tag of the nearest tokenised character to the left of each one
    for tag in char_tags:
        before.append(last)
        last = last if tag is None else tag
    following = "O"
    for i in range(n_chars - 1, -1, -1):  # fill untokenised characters, right to left
        if char_tags[i] is not None:
            following = char_tags[i]
            continue
        previous = before[i]
        inside = (previous != "O" and previous[0] in "BI" and following[:2] in ("I-", "E-")
                  and previous[2:] == following[2:])
        char_tags[i] = f"I-{following[2:]}" if inside else "O"
    return tags_to_spans(char_tags)


def resolve_overlaps(spans: list[Span]) -> tuple[list[Span], list[tuple[Span, Span]]]:
    """Keep the longer of overlapping spans (the earlier on a tie); return (kept, [(dropped, kept_instead)])."""
    kept, dropped = [], []
    for span in sorted(set(spans), key=lambda s: (-(s.end - s.start), s.start, s.type)):
        clash = next((k for k in kept if span.start <= k.end and k.start <= span.end), None)
        if clash is None:
            kept.append(span)
        else:
            dropped.append((span, clash))
    return sorted(kept, key=lambda s: s.start), dropped


def clue_label(spans: list[Span], text: str) -> dict:
    """CLUENER's ``{TYPE: {ENTITY: [[start, end], ...]}}`` for predicted spans."""
    label: dict = {}
    for s in spans:
        label.setdefault(s.type, {}).setdefault(text[s.start : s.end + 1], []).append([s.start, s.end])
    return label
