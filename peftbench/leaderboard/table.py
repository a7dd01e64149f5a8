"""A group's table as rows of text, shared by the Markdown and HTML pages."""

from __future__ import annotations

from peftbench.leaderboard.grouping import Group, Row, Scores, speed_in_doubt
from peftbench.leaderboard.significance import ALPHA, MIN_SEEDS_FOR_TEST, difference, pscp, significance
from peftbench.metrics import clue_average


def _fmt_cell(cell: Scores | None, mark: str = "") -> str:
    if cell is None:
        return "—"
    if not cell.scores:
        return "/".join(sorted(set(cell.failures)))
    spread = f" ± {100 * cell.std:.1f}" if len(cell.scores) > 1 else ""
    text = f"{100 * cell.mean:.1f}{spread} ({len(cell.scores)})"
    if cell.failures:
        text += f" +{len(cell.failures)} failed"
    return text + (f" {mark}" if mark else "")


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _average(row: Row, tasks: list[str]) -> str:
    means = {t: row.cells[t].mean if t in row.cells else None for t in tasks}
    return "—" if None in means.values() else f"{100 * clue_average(means):.1f}"


def table(group: Group) -> tuple[list[str], list[list[str]]]:
    marks = significance(group)
    head = (["method"] + [group.column(t) for t in group.tasks] + ["average", "PSCP", "trainable", "trainable %",
            "peak MB", "train samples/s", "train tokens/s", "adapter size", "latency ms p50 (merged)",
            "infer samples/s (merged)"])
    rows = []
    for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)):
        pct = row.mean_of("params", "trainable_pct")
        size = row.mean_of("params", "adapter_bytes")
        rows.append([row.label] + [_fmt_cell(row.cells.get(t), marks.get((row.label, t), "")) for t in group.tasks]
                    + [_average(row, group.tasks), _fmt_score(pscp(row, group.tasks)),
                       _fmt_count(row.mean_of("params", "trainable")),
                       "—" if pct is None else f"{pct:.2f}", _fmt_number(row.mean_of("metrics", "peak_memory_mb")),
                       _fmt_number(row.mean_of("metrics", "train_samples_per_s")),
                       _fmt_number(row.mean_of("metrics", "train_tokens_per_s")),
                       "—" if size is None else f"{_fmt_count(size)}B", row.serving("latency_ms_p50", 2),
                       row.serving("samples_per_s", 0)])
    return head, rows + baseline_rows(group, len(head))


BASELINES = {"chance": "chance (uniform guess)", "majority": "majority class"}


def baseline_rows(group: Group, width: int) -> list[list[str]]:
    """Unranked rows: the score of guessing on each task's evaluated split, from its records."""
    if not group.baselines:
        return []
    rows = []
    for key, label in BASELINES.items():
        cells = [group.baselines.get(t, {}).get(key) for t in group.tasks]
        rows.append([label] + ["—" if c is None else f"{100 * c:.1f}" for c in cells]
                    + ["—"] * (width - 1 - len(group.tasks)))
    return rows


def reference_table(group: Group) -> tuple[str, list[str], list[list[str]]] | None:
    """Each row with a reference row (:attr:`Group.references`) against it: per task the difference of the means
    in points with its 95 % interval (▲ / ▼ where the interval leaves out 0), and its training time relative to
    the reference's (from train samples/s); None when no row has one. First the table's title."""
    compared = [row for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label))
                if row.label in group.references]
    if not compared:
        return None
    rows = []
    for row in compared:
        reference = group.references[row.label]
        cells = []
        for task in group.tasks:
            d = difference(group, row, reference, task)
            mark = "" if d is None or d["low"] <= 0 <= d["high"] else " ▲" if d["low"] > 0 else " ▼"
            cells.append("—" if d is None else
                         f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}")
        speeds = row.mean_of("metrics", "train_samples_per_s"), reference.mean_of("metrics", "train_samples_per_s")
        doubt = any(speed_in_doubt(r) for r in row.records + reference.records if r["status"] == "success")
        time = "—" if None in speeds or not speeds[0] or doubt else f"×{speeds[1] / speeds[0]:.2f}"
        rows.append([row.label, reference.label, *cells, time])
    variants = all((r.get("provenance") or {}).get("variant") for row in compared for r in row.records)
    return (REFERENCE_NOTE + (VARIANTS_NOTE if variants else ""), ["method", "against"] + list(group.tasks)
            + ["train time"], rows)


REFERENCE_NOTE = ("Against a reference row (a trick row against its method's plain row, or every row against the "
                  "row named by --reference): the difference of the means in points, [95 % interval] (a paired "
                  "bootstrap over evaluated examples and seeds where the records hold per-example results, else "
                  "Welch's t over seeds); ▲ / ▼ where the interval leaves out 0. Train time: time per training "
                  "example relative to the reference row's; — where a CPU run of either row recorded no "
                  "train_cpu_share (older records) or shared its core: nothing vouches for its samples/s.")
VARIANTS_NOTE = (" The compared rows are a sweep's final variants: each ran at the learning rate the search chose "
                 "for its plain row, not searched itself.")

LR_EDGE_NOTE = "↑ / ↓: the top / bottom of the method's search range, so the best rate may lie beyond it."


def lr_table(group: Group) -> tuple[str, list[str], list[list[str]]] | None:
    """What the search chose per tuned row and task: the learning rate, marked where it ends the search range,
    then every other searched key's value (None: no tuned rows); first the table's title."""
    tuned = [row for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)) if row.chosen_lr]
    if not tuned:
        return None
    more = any(chosen for row in tuned for chosen in row.chosen_settings.values())
    title = ("Settings chosen on dev by the search (the learning rate, then the other searched keys):" if more
             else "Learning rate chosen on dev by the search:")
    return (title, ["method"] + list(group.tasks),
            [[row.label] + [_chosen(row, t) if t in row.chosen_lr else "—" for t in group.tasks] for row in tuned])


def _chosen(row, task: str) -> str:
    others = [f"{k.split('.', 1)[1]}={f'{v:.3g}' if isinstance(v, float) else v}"
              for k, v in sorted(row.chosen_settings.get(task, {}).items())]
    return "; ".join([f"{row.chosen_lr[task]:.3g}{row.lr_edge.get(task, '')}", *others])


def _fmt_score(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _fmt_number(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def _csv_number(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


NOTES = ("Cells: the task's score in % (accuracy, or entity F1 where the header says F1), mean ± std over seeds "
         "(n seeds); split in the header (test = labeled test split). "
         "Average: the CLUE-style mean of the task means over this table's task columns only (not a "
         "benchmark's other tasks), where a row has every one of them. PSCP: the average with "
         "PEFT-Bench's soft penalties for trainable parameters, extra inference FLOPs and training memory "
         "(docs/leaderboards.md). Trainable: parameters trained "
         "(mean over tasks; heads differ in size). Peak MB: max over processes (GPU: max allocated; CPU: peak RSS). "
         "Latency: one sequence of median length, median of 50 calls; infer samples/s: evaluation batches in file "
         "order; (merged): LoRA-style updates folded into the weights. "
         f"★ best mean per task; ☆ not significantly worse than ★ (p ≥ {ALPHA}, ≥ {MIN_SEEDS_FOR_TEST} seeds "
         "each: a paired bootstrap over evaluated examples and seeds together where the records hold per-example "
         "results, else Welch's t-test over seeds). Chance and majority-class rows: the score of guessing on the "
         "evaluated split (uniformly random labels; always the most frequent label; for NER, no entity), unranked.")


def visible(text: str) -> str:
    """``text`` with every control character (newlines included) written as its escape, ``\\n``: one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def source_line(source: dict) -> str:
    """One record folder in words: where, how many records, on what hardware, from when to when."""
    return (f"{source['folder']} ({source['records']} records on {', '.join(source['hardware'])}, "
            f"{source['first'][:10]} to {source['last'][:10]})")
