"""``leaderboard.html``: one self-contained page with sortable tables and the plots inlined."""

from __future__ import annotations

import base64
import html

from peftbench.leaderboard.grouping import Group
from peftbench.leaderboard.significance import interval
from peftbench.leaderboard.table import LR_EDGE_NOTE, NOTES, lr_table, reference_table, source_line, table

SORT_SCRIPT = """
document.querySelectorAll("table").forEach(t => t.querySelectorAll("th").forEach((th, i) => th.onclick = () => {
  const rows = [...t.tBodies[0].rows], asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
  const key = r => { const v = parseFloat(r.cells[i].textContent); return isNaN(v) ? r.cells[i].textContent : v; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => t.tBodies[0].appendChild(r)); }));
"""


def html_page(groups: list[Group], records: list[dict], pngs: dict[str, bytes], sources: list[dict]) -> str:
    newest = max(r["finished_at"] for r in records)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>peftbench leaderboard</title><style>",
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;"
             "background:#eee}img{max-width:100%}</style></head><body>",
             "<h1>peftbench leaderboard</h1>", f"<p>{len(records)} records, newest {html.escape(newest)}. "
             f"{html.escape(NOTES)} Click a header to sort.</p>",
             "<p>Sources: " + "; ".join(html.escape(source_line(s)) for s in sources) + ".</p>"]
    for group in groups:
        head, rows = table(group)
        parts.append(f"<h2>{html.escape(group.title)}</h2><p>Budget: {html.escape(group.budget)}.</p>")
        for note in (group.backbone_note, group.older_note, group.memory_note, group.speed_note):
            if note:
                parts.append(f"<p>{html.escape(note)}</p>")
        ordered = sorted(group.rows.values(), key=lambda r: (r.method, r.label))  # as table() orders them
        titles = {(i, j): f"95 % interval {100 * ci[0]:.1f} to {100 * ci[1]:.1f} (bootstrap over examples and seeds)"
                  for i, row in enumerate(ordered) for j, task in enumerate(group.tasks, 1)
                  if (ci := interval(group, row, task)) is not None}
        parts.append(html_table(head, rows, titles))
        if group.footnotes:
            parts.append("<p>Cells pooling runs of other versions:</p><ul>"
                         + "".join(f"<li>{html.escape(n)}</li>" for n in group.footnotes) + "</ul>")
        against = reference_table(group)
        if against:
            parts += [f"<p>{html.escape(against[0])}</p>", html_table(*against[1:])]
        chosen = lr_table(group)
        if chosen:
            parts += [f"<p>{html.escape(chosen[0])}</p>", html_table(*chosen[1:]),
                      f"<p>{html.escape(LR_EDGE_NOTE)}</p>"]
        for command in sorted(group.reproduce):
            parts.append(f"<p>Reproduce: <code>{html.escape(command)}</code></p>")
        for name, data in sorted(pngs.items()):
            if name.startswith(group.slug):
                parts.append(f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    parts.append(f"<script>{SORT_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def html_table(head: list[str], rows: list[list[str]], titles: dict[tuple[int, int], str] | None = None) -> str:
    """A table; ``titles``: (row, column) -> the text a cell shows on hover."""
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)

    def cell(i: int, j: int, text: str) -> str:
        title = (titles or {}).get((i, j))
        opening = f"<td title='{html.escape(title)}'>" if title else "<td>"
        return f"{opening}{html.escape(text)}</td>"
    body = "".join("<tr>" + "".join(cell(i, j, c) for j, c in enumerate(r)) + "</tr>" for i, r in enumerate(rows))
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"
