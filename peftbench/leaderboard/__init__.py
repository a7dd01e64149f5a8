"""Records -> comparable leaderboard tables (Markdown, CSV, HTML) and plots.

Records are grouped into one table per (backbone, hardware, precision): numbers
from different backbones or machines are never ranked together. A row is a
method with its settings (everything in the config but the task and the seed);
a cell is a task's score over seeds, mean ± std (n). The score is the task's
headline metric (accuracy; entity F1 for NER) on the labeled test split where
every record has one, else on dev. With at least
3 seeds, the best mean per task is marked ★ and every row not significantly
worse than it (a paired bootstrap over examples and seeds, or Welch's t-test over seeds where
records lack per-example results; p >= 0.05) ☆; rows on a random-init backbone are
labelled and not ranked. A row trained with a trick is compared with its method's plain row (or every row
with a chosen ``reference`` row): the difference per task with its 95 % interval. The same records always give
byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.leaderboard.grouping import Group, build
from peftbench.leaderboard.plots import pareto, plot
from peftbench.leaderboard.reading import collect, sources
from peftbench.leaderboard.render_csv import csv_text
from peftbench.leaderboard.render_html import html_page
from peftbench.leaderboard.render_json import json_text
from peftbench.leaderboard.render_md import markdown, md, run_summary
from peftbench.leaderboard.render_model_index import model_index_text
from peftbench.leaderboard.significance import significance
from peftbench.leaderboard.table import table
from peftbench.records import write_text_atomic

__all__ = ["Group", "build", "collect", "csv_text", "html_page", "json_text", "markdown", "md", "model_index_text",
           "pareto", "run_summary", "significance", "sources", "table", "write"]


def write(dirs: list[str | Path], out_dir: str | Path, strict: bool = False, with_model_index: bool = False,
          reference: str | None = None) -> tuple[list[Path], list[str]]:
    """Build the leaderboard of every usable record under ``dirs`` into ``out_dir``; returns the files written
    and why each unusable record was skipped. ``strict``: an unusable record, or a cell pooling runs of other
    versions, is an error instead. ``with_model_index``: also ``model-index.yaml``, every row as a model-index
    entry. ``reference``: a row label that every other row of its table is compared with."""
    records, skipped = collect(dirs, strict)
    groups = build(records, reference)
    if reference is not None and not any(group.references for group in groups):
        labels = sorted({row.label for group in groups for row in group.rows.values()})
        raise PeftbenchError(f"--reference {reference!r}: no table has a row of this label and another row; rows: "
                             + "; ".join(labels[:20]))
    if strict:
        for group in groups:
            if group.footnotes:
                raise PeftbenchError(f"{group.title}: {group.footnotes[0]} (--strict)")
    found = sources(dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs, names = {}, {}
    for group in groups:
        group_pngs = plot(group, out_dir)
        pngs.update(group_pngs)
        names[group.slug] = sorted(group_pngs)
    files = {"leaderboard.md": markdown(groups, records, names, skipped, found), "leaderboard.csv": csv_text(groups),
             "leaderboard.html": html_page(groups, records, pngs, found),
             "leaderboard.json": json_text(groups, records, found)}
    if with_model_index:
        files["model-index.yaml"] = model_index_text(groups)
    for name, text in files.items():
        write_text_atomic(out_dir / name, text)  # a table cut short never replaces the last whole one
    return [out_dir / name for name in files], skipped
