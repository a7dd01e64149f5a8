"""The Markdown page (``leaderboard.md``) and the summary table ``run`` and ``sweep`` print."""

from __future__ import annotations

import html
from pathlib import Path

from peftbench.leaderboard.grouping import Group
from peftbench.leaderboard.table import (
    LR_EDGE_NOTE,
    NOTES,
    lr_table,
    reference_table,
    source_line,
    table,
    visible,
)


def md(text: str) -> str:
    """Record text made safe for Markdown: no HTML, no table breaks, no links or images, and no line breaks
    (:func:`visible`), so a cell stays one cell of its row."""
    text = visible(str(text).replace("\\", "\\\\"))
    return html.escape(text, quote=False).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(md, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(md, row)) + " |" for row in rows])


def run_summary(records: list[dict]) -> str:
    """One Markdown row per finished run (what ``peftbench run`` and ``sweep`` print at the end)."""
    head = ["task", "method", "backbone", "seed", "lr", "metric", "dev", "test", "trainable", "trainable %",
            "train samples/s", "train tokens/s", "peak MB", "wall s"]
    rows = []
    for r in records:
        m, p, c = r["metrics"], r["params"], r["config"]
        test = f"{m['test_score']:.4f}" if "test_score" in m else "-"
        rows.append([c["task"]["name"], c["method"]["name"], backbone_label(r["backbone"]), str(c["train"]["seed"]),
                     f"{c['train']['lr']:g}", m["score_name"], f"{m['score']:.4f}", test, f"{p['trainable']:,}",
                     f"{p['trainable_pct']:.2f}",
                     f"{m['train_samples_per_s']:.1f}", f"{m['train_tokens_per_s']:.0f}", f"{m['peak_memory_mb']:.0f}",
                     f"{m['wall_s']:.1f}"])
    return markdown_table(head, rows)


def backbone_label(backbone: dict) -> str:
    """A record's backbone in a few words: a hub name as is, a local folder by its last two parts."""
    name = backbone["name_or_path"]
    if backbone["random_init"]:
        return f"{name} (random init)"
    return "/".join(Path(name).parts[-2:]) if name.startswith(("/", ".", "~")) else name


def markdown(groups: list[Group], records: list[dict], plots: dict[str, list[str]], skipped: list[str],
             sources: list[dict]) -> str:
    newest = max(str(r["finished_at"]) for r in records)
    note = f" {len(skipped)} unreadable records skipped." if skipped else ""
    lines = ["# Leaderboard", "", f"{len(records)} records, newest {md(newest)}.{note} {NOTES}", "",
             "Sources: " + "; ".join(md(source_line(s)) for s in sources) + ".", ""]
    for group in groups:
        head, rows = table(group)
        lines += [f"## {md(group.title)}", "", f"Budget: {md(group.budget)}.", ""]
        if group.random_init:
            lines += ["Random-init backbone: these numbers test the machinery; they do not rank the methods.", ""]
        for note in (group.backbone_note, group.older_note, group.memory_note, group.speed_note):
            if note:
                lines += [md(note), ""]
        lines.append(markdown_table(head, rows))
        lines.append("")
        if group.footnotes:
            lines += ["Cells pooling runs of other versions or CPU kernels:", "",
                      *(f"- {md(n)}" for n in group.footnotes), ""]
        against = reference_table(group)
        if against:
            lines += [md(against[0]), "", markdown_table(*against[1:]), ""]
        chosen = lr_table(group)
        if chosen:
            lines += [chosen[0], "", markdown_table(*chosen[1:]), "", LR_EDGE_NOTE, ""]
        for command in sorted(group.reproduce):
            command = visible(command.replace("`", ""))  # a code span: no backtick, one line
            lines.append(f"Reproduce: `{command}`, then `peftbench leaderboard RESULTS_DIR --out DIR`.")
        for name in plots.get(group.slug, []):
            lines.append(f"![{name}]({name}.png)")
        lines.append("")
    return "\n".join(lines)
