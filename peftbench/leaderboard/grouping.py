"""Records -> groups (one table per backbone, hardware and precision), rows (a method with its settings)
and cells (a task's scores over seeds): what may be compared with what."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.errors import PeftbenchError
from peftbench.records import NOT_IDENTITY, RECORD_NAME, read_record

PRECISION_WORDS = {"no": "fp32", "fp16": "fp16 mixed", "bf16": "bf16 mixed"}  # train.mixed_precision
QUANTIZATION_WORDS = {"8bit": "8-bit base", "4bit": "4-bit base"}  # model.quantization


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
    """Every usable record under ``dirs``, and why each other one was skipped (``strict``: an error instead).
    A run found in several folders on one kind of hardware (workers of one sweep, a failed cell retried
    elsewhere) counts once: its successful record, else its newest."""
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
    best: dict[str, dict] = {}
    for r in records:
        run = _run(r)
        if run not in best or (r["status"] == "success", r["finished_at"]) > (best[run]["status"] == "success",
                                                                              best[run]["finished_at"]):
            best[run] = r
    return [r for r in records if best[_run(r)] is r], skipped


def _run(record: dict) -> str:
    """A run's identity: its run id, its config but where it was written, and its hardware."""
    return record["run_id"] + _hardware(record["env"]) + json.dumps(
        {k: v for k, v in record["config"].items() if k != "output_dir"}, sort_keys=True, default=str)


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
            row.lr_edge[task] = range_edge(cfg["train"]["lr"], r["provenance"].get("budget", {}).get("lr_range"))
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


def range_edge(lr: float, lr_range: list[float] | None) -> str:
    """"↑" or "↓" when ``lr`` is the top or bottom of the search range (the best rate may lie beyond it)."""
    if not lr_range:
        return ""
    if math.isclose(lr, lr_range[1], rel_tol=1e-2):
        return "↑"
    return "↓" if math.isclose(lr, lr_range[0], rel_tol=1e-2) else ""
