"""Records -> comparable leaderboard tables (Markdown, CSV, HTML) and plots.

Records are grouped into one table per (backbone, hardware, precision): numbers
from different backbones or machines are never ranked together. A row is a
method with its settings (everything in the config but the task and the seed);
a cell is a task's score over seeds, mean ± std (n). The score is the task's
headline metric (accuracy; entity F1 for NER) on the labeled test split where
every record has one, else on dev. With at least
3 seeds, the best mean per task is marked ★ and every row not significantly
worse than it (Welch's t-test, p >= 0.05) ☆; rows on a random-init backbone are
labelled and not ranked. The same records always give byte-identical files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.records import NOT_IDENTITY, RECORD_NAME, read_record

ALPHA = 0.05
MIN_SEEDS_FOR_TEST = 3
PRECISION_WORDS = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}  # train.mixed_precision
QUANTIZATION_WORDS = {"8bit": "8-bit base", "4bit": "4-bit base"}  # model.quantization
# PEFT-Bench's PSCP (Belanec et al. 2025, arXiv:2511.21285): score x (1 + M/C)^-beta per cost, with its constants
PSCP_C = {"params": 5e8, "tflops": 10.0, "memory_gb": 94.0}
PSCP_BETA = {"params": 1.0, "tflops": 1.0, "memory_gb": 1.0}


@dataclass
class Scores:
    scores: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class Row:
    method: str
    settings: str
    cells: dict[str, Scores] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    chosen_lr: dict[str, float] = field(default_factory=dict)  # task -> learning rate a search chose (tuned rows)
    lr_edge: dict[str, str] = field(default_factory=dict)  # task -> "↑"/"↓" where that rate ends the search range

    @property
    def label(self) -> str:
        return f"{self.method} ({self.settings})" if self.settings else self.method

    def mean_of(self, section: str, key: str) -> float | None:
        """Mean of ``record[section][key]`` over the successful records that have it; ``section`` may be a
        dotted path (``inference.merged``)."""
        values = []
        for r in self.records:
            node = r if r["status"] == "success" else {}
            for part in section.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and _number(node.get(key)):
                values.append(node[key])
        return statistics.fmean(values) if values else None

    def serving(self, key: str, digits: int) -> str:
        """An inference-cost figure as trained, and merged in parentheses where the method merges."""
        trained, merged = self.mean_of("inference.as_trained", key), self.mean_of("inference.merged", key)
        if trained is None:
            return "—"
        return f"{trained:.{digits}f}" + ("" if merged is None else f" ({merged:.{digits}f})")


@dataclass
class Group:
    backbone: str
    hardware: str
    precision: str
    random_init: bool
    rows: dict[tuple, Row] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)
    split: dict[str, str] = field(default_factory=dict)  # task -> "test" or "dev"
    metric: dict[str, str] = field(default_factory=dict)  # task -> the score's name (accuracy, entity_f1)
    reproduce: set[str] = field(default_factory=set)
    pretrained: dict | None = None  # backbone.pretrained_by_peftbench of its records
    baselines: dict[str, dict] = field(default_factory=dict)  # task -> {"chance", "majority"} on its split
    search: list[dict] = field(default_factory=list)  # records of learning-rate search trials (dev only)

    @property
    def display_name(self) -> str:
        """The backbone in words: a hub name as is; a model made by ``peftbench pretrain`` by its run's folder
        name and run; another local folder by its last two parts."""
        path = Path(self.backbone)
        if self.pretrained:
            name = path.parent.name if path.name == "model" else path.name
            return f"{name} (pretrained by peftbench, run {self.pretrained['run_id'][:8]})"
        return "/".join(path.parts[-2:]) if self.backbone.startswith(("/", ".", "~")) else self.backbone

    @property
    def records(self) -> list[dict]:
        return [r for row in self.rows.values() for r in row.records]

    @property
    def budget(self) -> str:
        """The training budget of the table's runs: steps or epochs, batch, max length, search, seeds."""
        records = self.records

        def values(get) -> str:
            return "/".join(str(v) for v in sorted({get(r) for r in records}, key=str))

        train = lambda r: r["config"]["train"]  # noqa: E731
        lengths: dict[str, set] = {}
        for r in records:
            lengths.setdefault(r["config"]["task"]["name"], set()).add(r["config"]["task"]["max_length"])
        distinct = set().union(*lengths.values())
        length = (str(distinct.pop()) if len(distinct) == 1 else
                  ", ".join(f"{t} {'/'.join(map(str, sorted(v)))}" for t, v in sorted(lengths.items())))
        steps = values(lambda r: f"{train(r)['max_steps']} steps" if train(r)["max_steps"] > 0
                       else f"{train(r)['epochs']} epochs")
        batch = values(lambda r: train(r)["batch_size"] * train(r)["grad_accum_steps"]
                       * r["env"].get("num_processes", 1))
        parts = [steps, f"batch {batch}", f"max length {length}"]
        budgets = [r["provenance"]["budget"] for r in records if r.get("provenance", {}).get("phase") == "final"]
        if budgets:
            trials = "/".join(sorted({str(b["trials"]) for b in budgets}))
            seeds = "/".join(sorted({", ".join(map(str, b["seeds"])) for b in budgets}))
            parts.append(f"learning rate searched: {trials} trials per method ({budgets[0]['sampler']}, mean dev "
                         f"score of seed{'s' if ',' in seeds else ''} {seeds})")
        parts.append(f"seeds {values(lambda r: train(r)['seed']).replace('/', ', ')}")
        return " · ".join(parts)

    @property
    def memory_note(self) -> str | None:
        if any(r["metrics"].get("memory_kind") == "cpu_peak_rss" for r in self.records):
            return ("Peak MB here is the peak resident memory of the CPU process, Python and its libraries "
                    "included (not only tensors): compare rows within this table, not with GPU figures.")
        return None

    @property
    def backbone_note(self) -> str | None:
        """Where a backbone made by ``peftbench pretrain`` came from."""
        p = self.pretrained
        if not p:
            return None
        corpus = ", ".join(p["corpus"])
        return (f"Backbone pretrained by `peftbench pretrain` (run {p['run_id']}): {p['steps']} steps of masked-LM "
                f"on {corpus}, held-out MLM loss {p['mlm_loss']:.3f}, on {p['device']}.")

    def column(self, task: str) -> str:
        """A task's column title: its name, split, and the metric when it is not accuracy."""
        metric = {"accuracy": "", "entity_f1": ", F1"}.get(self.metric[task], f", {self.metric[task]}")
        return f"{task} ({self.split[task]}{metric})"

    @property
    def title(self) -> str:
        init = " (random init: not a ranking)" if self.random_init else ""
        return f"{self.display_name}{init} · {self.hardware} · {PRECISION_WORDS.get(self.precision, self.precision)}"

    @property
    def slug(self) -> str:
        text = f"{self.backbone}-{self.hardware}-{self.precision}".lower()
        return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:80]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_for_table(record: dict, source: str) -> dict:
    """The fields a table reads, with the types it needs (a record can be valid JSON and still unusable)."""
    config = record["config"]
    if not isinstance(config, dict) or not isinstance(record.get("finished_at"), str):
        raise PeftbenchError(f"{source}: fields 'config' (an object) and 'finished_at' (a time) are needed")
    for section, key in (("task", "name"), ("method", "name"), ("model", "name_or_path"), ("train", "lr"),
                         ("train", "seed"), ("train", "mixed_precision")):
        value = config.get(section, {}).get(key) if isinstance(config.get(section), dict) else None
        if value is None or (key == "lr" and not _number(value)):
            raise PeftbenchError(f"{source}: field 'config.{section}.{key}' missing or not usable ({value!r})")
    if not isinstance(record["env"], dict):
        raise PeftbenchError(f"{source}: field 'env' is not an object")
    if record["status"] == "success":
        metrics = record["metrics"]
        for key in ("score", *(["test_score"] if "test_score" in metrics else [])):
            if not _number(metrics.get(key)):
                raise PeftbenchError(f"{source}: field 'metrics.{key}' is {metrics.get(key)!r}, not a finite number")
    return record


def collect(dirs: list[str | Path], strict: bool = False) -> tuple[list[dict], list[str]]:
    """Every usable record under ``dirs``, and why each other one was skipped (``strict``: an error instead)."""
    paths = sorted(p for d in dirs for p in Path(d).rglob(RECORD_NAME)  # not the staging folder of a running run
                   if not any(part.startswith(".") for part in p.relative_to(d).parts))
    if not paths:
        raise PeftbenchError(f"no {RECORD_NAME} under {', '.join(map(str, dirs))}")
    records, skipped = [], []
    for path in paths:
        try:
            records.append(_check_for_table(read_record(path), str(path)))
        except PeftbenchError as exc:
            if strict:
                raise
            skipped.append(str(exc))
    if not records:
        raise PeftbenchError(f"no usable {RECORD_NAME} under {', '.join(map(str, dirs))} ({len(skipped)} skipped)")
    return records, skipped


def _hardware(env: dict) -> str:
    procs = env.get("num_processes", 1)
    return f"{env.get('device_name', 'unknown')} ×{procs}"


def _settings(record: dict) -> tuple[tuple, str]:
    """The row identity (all but task and seed, and the learning rate where a search chose it) and its short
    label (the settings the run recorded as away from their defaults, and the learning rate)."""
    config = record["config"]
    tuned = record.get("provenance", {}).get("phase") == "final"
    method = dict(config["method"])
    name = method.pop("name")
    train = {k: v for k, v in config["train"].items()  # keys that change no result (NOT_IDENTITY) split no row
             if k != "seed" and k not in NOT_IDENTITY and not (tuned and k == "lr")}
    identity = (name, json.dumps(method, sort_keys=True), json.dumps(train, sort_keys=True),
                json.dumps({k: v for k, v in config["model"].items()}, sort_keys=True), tuned)
    settings = record.get("settings") or {"method": method, "model": {}}  # older records: every method key
    model = dict(settings["model"])
    words = [QUANTIZATION_WORDS[model.pop("quantization")]] if model.get("quantization") in QUANTIZATION_WORDS else []
    changed = {**settings["method"], **model}
    lr = "lr tuned" if tuned else f"lr={train['lr']:g}"
    label = ", ".join(words + [f"{k}={v}" for k, v in sorted(changed.items())] + [lr])
    return identity, label


def build(records: list[dict]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in records:
        cfg = r["config"]
        backbone = cfg["model"]["name_or_path"]
        key = (backbone, _hardware(r["env"]), cfg["train"]["mixed_precision"])
        random_init = r.get("backbone", {}).get("random_init", backbone == "tiny")
        group = groups.setdefault(key, Group(*key, random_init=random_init))
        group.pretrained = group.pretrained or r.get("backbone", {}).get("pretrained_by_peftbench")
        if r.get("provenance", {}).get("phase") == "search":
            group.search.append(r)
            continue
        identity, label = _settings(r)
        row = group.rows.setdefault(identity, Row(cfg["method"]["name"], label))
        row.records.append(r)
        task = cfg["task"]["name"]
        if r.get("provenance", {}).get("phase") == "final":
            row.chosen_lr[task] = cfg["train"]["lr"]
            row.lr_edge[task] = _range_edge(cfg["train"]["lr"], r["provenance"].get("budget", {}).get("lr_range"))
        if task not in group.tasks:
            group.tasks.append(task)
        if r.get("provenance", {}).get("command"):
            group.reproduce.add(re.sub(r" --shard \d+/\d+", "", r["provenance"]["command"]))  # shards: one sweep
    for group in groups.values():
        group.tasks.sort()
        for task in group.tasks:
            ok = [r for row in group.rows.values() for r in row.records
                  if r["config"]["task"]["name"] == task and r["status"] == "success"]
            group.split[task] = "test" if ok and all("test_score" in r["metrics"] for r in ok) else "dev"
            group.metric[task] = ok[0]["metrics"]["score_name"] if ok else "accuracy"
            found = [r["baselines"][group.split[task]] for r in ok if group.split[task] in r.get("baselines", {})]
            if found:
                group.baselines[task] = found[0]
        for row in group.rows.values():
            for r in row.records:
                if r.get("interrupted"):  # cut short from outside: still to run, not a failure of the method
                    continue
                task = r["config"]["task"]["name"]
                cell = row.cells.setdefault(task, Scores())
                if r["status"] == "success":
                    cell.scores.append(r["metrics"]["test_score" if group.split[task] == "test" else "score"])
                else:
                    cell.failures.append("OOM" if "out of memory" in r.get("error", "").lower() else "failed")
    return [groups[k] for k in sorted(groups) if groups[k].rows]  # a search still running has no rows yet


def significance(group: Group) -> dict[tuple[str, str], str]:
    """(row label, task) -> '★' for the best mean, '☆' for rows not significantly worse (Welch, p >= ALPHA)."""
    from scipy.stats import ttest_ind

    marks = {}
    if group.random_init:
        return marks
    for task in group.tasks:
        candidates = [row for row in group.rows.values()
                      if len(row.cells.get(task, Scores()).scores) >= MIN_SEEDS_FOR_TEST]
        if len(candidates) < 2:
            continue
        best = max(candidates, key=lambda row: (row.cells[task].mean, row.label))
        marks[(best.label, task)] = "★"
        for row in candidates:
            if row is best:
                continue
            a, b = best.cells[task].scores, row.cells[task].scores
            with warnings.catch_warnings():  # identical seeds (a constant cell) are handled just below
                warnings.simplefilter("ignore", RuntimeWarning)
                p = ttest_ind(a, b, equal_var=False).pvalue
            if math.isnan(p):  # both without variance
                p = 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
            if p >= ALPHA:
                marks[(row.label, task)] = "☆"
    return marks


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
    means = [row.cells[t].mean if t in row.cells else None for t in tasks]
    return "—" if any(m is None for m in means) else f"{100 * statistics.fmean(means):.1f}"


def pscp(row: Row, tasks: list[str]) -> float | None:
    """PEFT-Bench's PSCP of a row: its average score (%) times a soft penalty per cost, (1 + M/C)^-beta, for
    trainable parameters, extra inference TFLOPs per sample over the plain backbone, and peak training
    memory (GiB); None when the row lacks a task or a cost."""
    means = [row.cells[t].mean if t in row.cells else None for t in tasks]
    served, base = row.mean_of("inference", "flops_per_sample"), row.mean_of("inference", "base_flops_per_sample")
    costs = {"params": row.mean_of("params", "trainable"), "memory_gb": row.mean_of("metrics", "peak_memory_mb"),
             "tflops": None if served is None or base is None else max(served - base, 0.0) / 1e12}
    if any(m is None for m in means) or any(c is None for c in costs.values()):
        return None
    costs["memory_gb"] /= 1024
    return 100 * statistics.fmean(means) * math.prod((1 + costs[k] / PSCP_C[k]) ** -PSCP_BETA[k] for k in costs)


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


def _range_edge(lr: float, lr_range: list[float] | None) -> str:
    """"↑" or "↓" when ``lr`` is the top or bottom of the search range (the best rate may lie beyond it)."""
    if not lr_range:
        return ""
    if math.isclose(lr, lr_range[1], rel_tol=1e-2):
        return "↑"
    return "↓" if math.isclose(lr, lr_range[0], rel_tol=1e-2) else ""


LR_EDGE_NOTE = "↑ / ↓: the top / bottom of the method's search range, so the best rate may lie beyond it."


def lr_table(group: Group) -> tuple[list[str], list[list[str]]] | None:
    """The learning rate the search chose per tuned row and task, marked where it ends the search range
    (None: no tuned rows)."""
    tuned = [row for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)) if row.chosen_lr]
    if not tuned:
        return None
    return (["method"] + list(group.tasks),
            [[row.label] + [f"{row.chosen_lr[t]:.3g}{row.lr_edge.get(t, '')}" if t in row.chosen_lr else "—"
                            for t in group.tasks] for row in tuned])


def _fmt_score(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def _fmt_number(x: float | None) -> str:
    return "—" if x is None else f"{x:.0f}"


def _csv_number(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


NOTES = ("Cells: the task's score in % (accuracy, or entity F1 where the header says F1), mean ± std over seeds "
         "(n seeds); split in the header (test = labeled test split). "
         "Average: the CLUE-style mean of the task means, where a row has every task. PSCP: the average with "
         "PEFT-Bench's soft penalties for trainable parameters, extra inference FLOPs and training memory "
         "(docs/leaderboards.md). Trainable: parameters trained "
         "(mean over tasks; heads differ in size). Peak MB: max over processes (GPU: max allocated; CPU: peak RSS). "
         "Latency: one sequence of median length, median of 50 calls; infer samples/s: evaluation batches in file "
         "order; (merged): LoRA-style updates folded into the weights. "
         f"★ best mean per task; ☆ not significantly worse than ★ (Welch's t-test, p ≥ {ALPHA}, "
         f"≥ {MIN_SEEDS_FOR_TEST} seeds each). Chance and majority-class rows: the score of guessing on the "
         "evaluated split (uniformly random labels; always the most frequent label; for NER, no entity), unranked.")


def visible(text: str) -> str:
    """``text`` with every control character (newlines included) written as its escape, ``\\n``: one line."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def md(text: str) -> str:
    """Record text made safe for Markdown: no HTML, no table breaks, no links or images, and no line breaks
    (:func:`visible`), so a cell stays one cell of its row."""
    text = visible(str(text).replace("\\", "\\\\"))
    return html.escape(text, quote=False).replace("|", "\\|").replace("[", "\\[").replace("]", "\\]")


def tex(text: str) -> str:
    """Record text made safe for matplotlib, which reads ``$...$`` as mathematics."""
    return visible(str(text)).replace("$", r"\$")


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


def markdown(groups: list[Group], records: list[dict], plots: dict[str, list[str]], skipped: list[str]) -> str:
    newest = max(str(r["finished_at"]) for r in records)
    note = f" {len(skipped)} unreadable records skipped." if skipped else ""
    lines = ["# Leaderboard", "", f"{len(records)} records, newest {md(newest)}.{note} {NOTES}", ""]
    for group in groups:
        head, rows = table(group)
        lines += [f"## {md(group.title)}", "", f"Budget: {md(group.budget)}.", ""]
        if group.random_init:
            lines += ["Random-init backbone: these numbers test the machinery; they do not rank the methods.", ""]
        for note in (group.backbone_note, group.memory_note):
            if note:
                lines += [md(note), ""]
        lines.append(markdown_table(head, rows))
        lines.append("")
        chosen = lr_table(group)
        if chosen:
            lines += ["Learning rate chosen on dev by the search:", "", markdown_table(*chosen), "", LR_EDGE_NOTE, ""]
        for command in sorted(group.reproduce):
            command = visible(command.replace("`", ""))  # a code span: no backtick, one line
            lines.append(f"Reproduce: `{command}`, then `peftbench leaderboard RESULTS_DIR --out DIR`.")
        for name in plots.get(group.slug, []):
            lines.append(f"![{name}]({name}.png)")
        lines.append("")
    return "\n".join(lines)


def csv_text(groups: list[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["backbone", "hardware", "precision", "random_init", "method", "settings", "task", "split",
                     "mean", "std", "n", "failed", "trainable", "peak_memory_mb", "train_samples_per_s",
                     "latency_ms_p50", "latency_ms_p95", "infer_samples_per_s", "merged_latency_ms_p50",
                     "merged_infer_samples_per_s"])
    for group in groups:
        for row in sorted(group.rows.values(), key=lambda r: (r.method, r.label)):
            for task in group.tasks:
                cell = row.cells.get(task)
                if cell is None:
                    continue
                writer.writerow([group.backbone, group.hardware, group.precision, group.random_init, row.method,
                                 row.settings, task, group.split[task],
                                 "" if cell.mean is None else f"{cell.mean:.6f}", f"{cell.std:.6f}", len(cell.scores),
                                 len(cell.failures), _fmt_number(row.mean_of("params", "trainable")),
                                 _fmt_number(row.mean_of("metrics", "peak_memory_mb")),
                                 _fmt_number(row.mean_of("metrics", "train_samples_per_s")),
                                 *(_csv_number(row.mean_of(f"inference.{state}", key))
                                   for state, key in (("as_trained", "latency_ms_p50"),
                                                      ("as_trained", "latency_ms_p95"),
                                                      ("as_trained", "samples_per_s"), ("merged", "latency_ms_p50"),
                                                      ("merged", "samples_per_s")))])
    return out.getvalue()


SORT_SCRIPT = """
document.querySelectorAll("table").forEach(t => t.querySelectorAll("th").forEach((th, i) => th.onclick = () => {
  const rows = [...t.tBodies[0].rows], asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
  const key = r => { const v = parseFloat(r.cells[i].textContent); return isNaN(v) ? r.cells[i].textContent : v; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => t.tBodies[0].appendChild(r)); }));
"""


def html_page(groups: list[Group], records: list[dict], pngs: dict[str, bytes]) -> str:
    newest = max(r["finished_at"] for r in records)
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>peftbench leaderboard</title><style>",
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}th{cursor:pointer;"
             "background:#eee}img{max-width:100%}</style></head><body>",
             "<h1>peftbench leaderboard</h1>", f"<p>{len(records)} records, newest {html.escape(newest)}. "
             f"{html.escape(NOTES)} Click a header to sort.</p>"]
    for group in groups:
        head, rows = table(group)
        parts.append(f"<h2>{html.escape(group.title)}</h2><p>Budget: {html.escape(group.budget)}.</p>")
        for note in (group.backbone_note, group.memory_note):
            if note:
                parts.append(f"<p>{html.escape(note)}</p>")
        parts.append(html_table(head, rows))
        chosen = lr_table(group)
        if chosen:
            parts += ["<p>Learning rate chosen on dev by the search:</p>", html_table(*chosen),
                      f"<p>{html.escape(LR_EDGE_NOTE)}</p>"]
        for command in sorted(group.reproduce):
            parts.append(f"<p>Reproduce: <code>{html.escape(command)}</code></p>")
        for name, data in sorted(pngs.items()):
            if name.startswith(group.slug):
                parts.append(f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>")
    parts.append(f"<script>{SORT_SCRIPT}</script></body></html>\n")
    return "\n".join(parts)


def html_table(head: list[str], rows: list[list[str]]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with lower-or-equal cost and higher score (cost ascending)."""
    front, best = [], -math.inf
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1])):
        if score > best:
            front.append((cost, score))
            best = score
    return front


def plot(group: Group, out_dir: Path) -> dict[str, bytes]:
    """Accuracy vs trainable params (log x) and vs peak memory per task, with Pareto fronts; throughput per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "peftbench"
    rows = sorted(group.rows.values(), key=lambda r: (r.method, r.label))
    pngs = {}

    def save(fig, name):
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, metadata=meta, dpi=90)
            (out_dir / f"{name}.{ext}").write_bytes(buf.getvalue())
            if ext == "png":
                pngs[name] = buf.getvalue()
        plt.close(fig)

    for x_key, section, xlabel, log in (("trainable", "params", "trainable parameters", True),
                                        ("peak_memory_mb", "metrics", "peak memory (MB)", False)):
        fig, axes = plt.subplots(1, len(group.tasks), figsize=(4 * len(group.tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], group.tasks):
            points = []
            for row in rows:
                cell = row.cells.get(task)
                x = statistics.fmean([r[section][x_key] for r in row.records if r["status"] == "success"
                                      and r["config"]["task"]["name"] == task] or [math.nan])
                if cell and cell.scores and not math.isnan(x):
                    ax.errorbar(x, 100 * cell.mean, yerr=100 * cell.std, fmt="o", capsize=3, label=tex(row.label))
                    points.append((x, 100 * cell.mean))
            front = pareto(points)
            if front:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", ls="--", lw=1,
                        label="Pareto front")
            ax.set_xscale("log" if log else "linear")
            ax.set_title(tex(group.column(task)))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("entity F1 (%)" if group.metric[task] == "entity_f1" else "accuracy (%)")
        legend_below(fig, axes)
        save(fig, f"{group.slug}-accuracy-vs-{'params' if log else 'memory'}")

    if group.search:
        save(sensitivity_figure(group, plt), f"{group.slug}-lr-sensitivity")

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.6))
    speeds = [row.mean_of("metrics", "train_samples_per_s") or 0 for row in rows]
    ax.bar(range(len(rows)), speeds)
    ax.set_xticks(range(len(rows)), [tex(row.label) for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("train samples/s (mean over tasks)")
    fig.tight_layout()
    save(fig, f"{group.slug}-throughput")
    return pngs


def sensitivity_figure(group: Group, plt):
    """Per task: mean dev score of each search trial against its learning rate, one line per study (a method
    with its settings), the chosen learning rate starred."""
    label = {r["provenance"]["study"]: row.label for row in group.rows.values() for r in row.records
             if r.get("provenance", {}).get("study")}
    chosen = {(r["provenance"]["study"], r["config"]["task"]["name"]): r["config"]["train"]["lr"]
              for row in group.rows.values() for r in row.records if r.get("provenance", {}).get("phase") == "final"}
    tasks = sorted({r["config"]["task"]["name"] for r in group.search})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        trials: dict[str, dict[float, list[float]]] = {}
        for r in group.search:
            if r["config"]["task"]["name"] == task and r["status"] == "success":
                study = r["provenance"]["study"]
                trials.setdefault(study, {}).setdefault(r["config"]["train"]["lr"], []).append(r["metrics"]["score"])
        for study in sorted(trials, key=lambda s: label.get(s, s)):
            lrs = sorted(trials[study])
            means = [100 * statistics.fmean(trials[study][lr]) for lr in lrs]
            line, = ax.plot(lrs, means, "o-", label=tex(label.get(study, study)))
            if (study, task) in chosen and chosen[study, task] in trials[study]:
                lr = chosen[study, task]
                ax.plot([lr], [100 * statistics.fmean(trials[study][lr])], "*", ms=14, color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(tex(f"{task} (dev; ★ chosen)"))
        ax.set_xlabel("learning rate")
        ax.set_ylabel("dev score (%)")
    legend_below(fig, axes)
    return fig


def legend_below(fig, axes) -> None:
    """The first panel's legend under all panels, in as many columns as its longest label leaves room for;
    the figure grows by the legend's rows, so the panels keep their size."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    chars = fig.get_figwidth() * 72 / 4.5  # characters of 7-point text across the figure
    ncol = max(1, min(4, len(labels), int(chars // (max(map(len, labels), default=1) + 8))))
    rows = math.ceil(len(labels) / ncol)
    legend_height = 0.2 + 0.15 * rows  # inches
    fig.set_figheight(fig.get_figheight() + legend_height)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))


def write(dirs: list[str | Path], out_dir: str | Path, strict: bool = False) -> tuple[list[Path], list[str]]:
    """Build the leaderboard of every usable record under ``dirs`` into ``out_dir``; returns the files written
    and why each unusable record was skipped."""
    records, skipped = collect(dirs, strict)
    groups = build(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs, names = {}, {}
    for group in groups:
        group_pngs = plot(group, out_dir)
        pngs.update(group_pngs)
        names[group.slug] = sorted(group_pngs)
    files = {"leaderboard.md": markdown(groups, records, names, skipped), "leaderboard.csv": csv_text(groups),
             "leaderboard.html": html_page(groups, records, pngs)}
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files], skipped
