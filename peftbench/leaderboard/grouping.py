"""Records -> groups (one table per backbone, hardware and precision), rows (a method with its settings)
and cells (a task's scores over seeds): what may be compared with what."""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from peftbench.leaderboard.reading import finite_number, hardware
from peftbench.records import (
    NOT_IDENTITY,
    comparable_config,
    later_train_keys,
    later_train_settings,
)

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
    chosen_settings: dict[str, dict] = field(default_factory=dict)  # task -> other searched keys' chosen values
    plain: str = ""  # the method and its settings without the learning rate and the training tricks
    tricks: bool = False  # trained with train.* settings added since records were first written (a trick, ...)

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
            if isinstance(node, dict) and finite_number(node.get(key)):
                values.append(node[key])
        return statistics.fmean(values) if values else None

    def serving(self, key: str, digits: int) -> str:
        """An inference-cost figure as trained, and merged in parentheses where the method merges."""
        trained, merged = self.mean_of("inference.as_trained", key), self.mean_of("inference.merged", key)
        if trained is None:
            return "—"
        return f"{trained:.{digits}f}" + ("" if merged is None else f" ({merged:.{digits}f})")


# env keys a cell's runs should share (a footnote if not): package versions, and the CPU kernels torch ran (one
# CPU name covers CPUs with and without AVX-512, whose speed and rounding differ). A record from before a key of
# RECORDED_SINCE has none, which says nothing: only the values recorded are compared.
VERSIONED = ("peftbench", "torch", "transformers", "peft", "cpu_capability")
RECORDED_SINCE = ("cpu_capability",)
# a one-thread CPU run's train_cpu_share below this: its speed is not its own (docs/measurement.md)
CLEAN_CPU_SHARE = 0.8


def shared_its_core(record: dict) -> bool:
    """A one-thread CPU run with ``train_cpu_share`` below :data:`CLEAN_CPU_SHARE`: its samples/s are not its own."""
    share = record["metrics"].get("train_cpu_share")
    return record["env"].get("torch_threads") == 1 and finite_number(share) and share < CLEAN_CPU_SHARE


def speed_in_doubt(record: dict) -> bool:
    """A CPU run whose samples/s nothing vouches for: one that shared its core, or one without a recorded
    ``train_cpu_share`` (records before it)."""
    return record["env"].get("device") == "cpu" and (
        shared_its_core(record) or not finite_number(record["metrics"].get("train_cpu_share")))


@dataclass
class Group:
    fingerprint: str | None  # the backbone's (records before fingerprints: None, grouped by path)
    hardware: str
    precision: str
    backbone: str  # its name or path, from the first record
    random_init: bool
    rows: dict[tuple, Row] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # column keys: the task's name, or with what sets it apart
    columns: dict[int, str] = field(default_factory=dict)  # id(record) -> its column key
    tag: str = ""  # what tells this backbone from another of the same name (its fingerprint's first digits)
    split: dict[str, str] = field(default_factory=dict)  # task -> "test" or "dev"
    metric: dict[str, str] = field(default_factory=dict)  # task -> the score's name (accuracy, entity_f1)
    reproduce: set[str] = field(default_factory=set)
    pretrained: dict | None = None  # backbone.pretrained_by_peftbench of its records
    baselines: dict[str, dict] = field(default_factory=dict)  # task -> {"chance", "majority"} on its split
    search: list[dict] = field(default_factory=list)  # records of learning-rate search trials (dev only)
    references: dict[str, Row] = field(default_factory=dict)  # row label -> the row its differences are taken to

    @property
    def display_name(self) -> str:
        """The backbone in words: a hub name as is; a model made by ``peftbench pretrain`` by its run's folder
        name and run; another local folder by its last two parts."""
        path = Path(self.backbone)
        if self.pretrained:
            name = path.parent.name if path.name == "model" else path.name
            return f"{name} (pretrained by peftbench, run {self.pretrained['run_id'][:8]})" + self.tag
        return ("/".join(path.parts[-2:]) if self.backbone.startswith(("/", ".", "~")) else self.backbone) + self.tag

    def task_of(self, record: dict) -> str:
        """The column a record of this group scores in."""
        return self.columns[id(record)]

    @property
    def footnotes(self) -> list[str]:
        """Cells whose runs differ in a library version, the peftbench they ran or the CPU kernels (named)."""
        notes = []
        for row in sorted(self.rows.values(), key=lambda r: (r.method, r.label)):
            for task in self.tasks:
                runs = [r for r in row.records if self.task_of(r) == task]
                mixed = {key: sorted({str(r["env"].get(key)) for r in runs
                                      if key not in RECORDED_SINCE or r["env"].get(key) is not None})
                         for key in VERSIONED}
                mixed = {key: found for key, found in mixed.items() if len(found) > 1}
                if mixed:
                    notes.append(f"{row.label} × {task} pools runs of " + "; ".join(
                        f"{key} {', '.join(found)}" for key, found in mixed.items()))
            searched = {}  # budget -> its tasks
            for r in row.records:
                if (r.get("provenance") or {}).get("phase") == "final":
                    searched.setdefault(budget_words(r["provenance"].get("budget")), set()).add(self.task_of(r))
            if len(searched) > 1:
                notes.append(f"{row.label} pools runs searched under {len(searched)} budgets: " + "; ".join(
                    f"{words} ({', '.join(sorted(tasks))})" for words, tasks in sorted(searched.items())))
        return notes

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
            space = sorted({key.split(".", 1)[1] for b in budgets for key in b.get("space", {})})
            samplers = "/".join(sorted({str(b["sampler"]) for b in budgets}))
            parts.append(f"learning rate{' and ' + ', '.join(space) if space else ''} searched: {trials} trials per "
                         f"method ({samplers}, mean dev score of seed{'s' if ',' in seeds else ''} {seeds})")
        parts.append(f"seeds {values(lambda r: train(r)['seed']).replace('/', ', ')}")
        return " · ".join(parts)

    @property
    def memory_note(self) -> str | None:
        if any(r["metrics"].get("memory_kind") == "cpu_peak_rss" for r in self.records):
            return ("Peak MB here is the peak resident memory of the CPU process, Python and its libraries "
                    "included (not only tensors): compare rows within this table, not with GPU figures.")
        return None

    @property
    def speed_note(self) -> str | None:
        """The rows whose train samples/s (a mean over their tasks' runs) pool one-thread CPU runs in which a
        process did not have its core to itself (another job ran beside it, or it was paused):
        ``metrics.train_cpu_share`` below :data:`CLEAN_CPU_SHARE`. Runs of several threads sit lower alone too
        (their serial parts): not judged."""
        shared = []
        for row in sorted(self.rows.values(), key=lambda r: (r.method, r.label)):
            runs = [r for r in row.records if r["status"] == "success"]
            low = [r for r in runs if shared_its_core(r)]
            if low:
                tasks = sorted({self.task_of(r) for r in low})
                shared.append(f"{row.label}: {len(low)} of {len(runs)} runs ({', '.join(tasks)})")
        if not shared:
            return None
        return (f"Train samples/s of these rows pool one-thread runs in which a process had its core less than "
                f"{100 * CLEAN_CPU_SHARE:.0f} % of the time (train_cpu_share: another job shared it, or the run was "
                "paused), so they read low: " + "; ".join(shared) + ".")

    @property
    def older_note(self) -> str | None:
        """What identifies the runs of a table whose records predate fingerprints."""
        older = sum(1 for r in self.records
                    if r["status"] == "success" and not (r.get("data") or {}).get("fingerprints"))
        if not self.fingerprint:
            return ("These records predate fingerprints: the backbone is told by its path, each task by its "
                    "settings (not by its data files or loader version).")
        if older:
            return (f"{older} of {len(self.records)} records predate data fingerprints: their tasks have columns "
                    "of their own (older records).")
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
        name = self.backbone  # before fingerprints: the whole path (the committed plots keep their names)
        if self.fingerprint:  # a short name, so that the fingerprint survives the cut to 80 characters
            name = "/".join(Path(self.backbone).parts[-2:]) + f"-{self.fingerprint[:8]}"
        text = f"{name}-{self.hardware}-{self.precision}".lower()
        return "".join(c if c.isalnum() else "-" for c in text).strip("-")[:80]


def budget_words(budget) -> str:
    """A search budget (a final record's ``provenance.budget``; final seeds aside) in words: ``3 trials (grid, lr
    1e-05-0.003, seeds 1)``, with the searched space's keys and ranges."""
    if not isinstance(budget, dict):
        return "an unrecorded budget"
    lr = budget.get("lr_range")
    parts = [str(budget.get("sampler"))]
    if isinstance(lr, list) and len(lr) == 2 and all(isinstance(v, (int, float)) for v in lr):
        parts.append(f"lr {lr[0]:g}-{lr[1]:g}")
    parts.append("seeds " + ", ".join(map(str, budget.get("seeds", []))))
    parts += [f"{key} {json.dumps(values, sort_keys=True)}" for key, values in sorted(budget.get("space", {}).items())]
    return f"{budget.get('trials')} trials ({', '.join(parts)})"


def _settings(record: dict) -> tuple[tuple, str, str, bool]:
    """The row identity (all but task and seed, and the keys a search chose: the learning rate and its space)
    and its short label (the settings the run recorded as away from their defaults, and what was tuned)."""
    config = record["config"]
    tuned = record.get("provenance", {}).get("phase") == "final"
    searched = list(record["provenance"].get("budget", {}).get("space", {})) if tuned else []
    config = _without(config, searched)
    config = comparable_config(config)  # keys older records lack count at their defaults
    method = dict(config["method"])
    name = method.pop("name")
    train = {k: v for k, v in config["train"].items()  # keys that change no result (NOT_IDENTITY) split no row
             if k != "seed" and k not in NOT_IDENTITY and not (tuned and k == "lr")}
    model = {k: v for k, v in config["model"].items() if k not in ("name_or_path", "tokenizer")}  # the group's
    identity = (name, json.dumps(method, sort_keys=True), json.dumps(train, sort_keys=True),
                json.dumps(model, sort_keys=True), tuned)
    later = later_train_keys()  # a trick row's plain row: the same but for the rate and the later train keys
    plain = json.dumps([name, method, {k: v for k, v in train.items() if k != "lr" and k not in later}, model],
                       sort_keys=True)
    settings = _without(record.get("settings") or {"method": method, "model": {}}, searched)  # older: every key
    model = dict(settings["model"])
    words = [QUANTIZATION_WORDS[model.pop("quantization")]] if model.get("quantization") in QUANTIZATION_WORDS else []
    changed = {**settings["method"], **model}
    lr = ", ".join(["lr", *(k.split(".", 1)[1] for k in searched)]) + " tuned" if tuned else f"lr={train['lr']:g}"
    tricks = [f"{k}={v}" for k, v in later_train_settings(config).items()]  # the schedule, ...
    label = ", ".join(words + [f"{k}={v}" for k, v in sorted(changed.items())] + [lr] + tricks)
    members = (record.get("ensemble") or {}).get("members")
    if members:  # its own row: the members' labels, not the first member's config
        labels = sorted(m["label"] for m in members)
        label = (f"{len(labels)} × {labels[0]}" if len(set(labels)) == 1 else " + ".join(labels))
        return ("ensemble", label), label, "", False
    provenance = record.get("provenance") or {}  # a sweep's final.variants say which rows are plain
    return identity, label, plain, provenance["variant"] is not None if "variant" in provenance else bool(tricks)


def row_label(record: dict) -> str:
    """The label of the leaderboard row a record joins: its method and settings."""
    name = record["config"]["method"]["name"]
    settings = _settings(record)[1]
    return f"{name} ({settings})" if settings else name


def _without(tree: dict, dotted: list[str]) -> dict:
    """A copy of ``tree`` without the dotted keys (``method.r``, ``method.options.r``) that it holds."""
    tree = json.loads(json.dumps(tree))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def task_identity(record: dict) -> dict:
    """What makes a task's score comparable: the task's settings (not where its files lie), the loader's version
    and the fingerprint of every split read (None in records from before these were recorded)."""
    data = record.get("data") or {}
    fingerprints = data.get("fingerprints")
    return {"settings": {k: v for k, v in record["config"]["task"].items() if k not in ("name", "data_dir")},
            "version": data.get("task_version"),
            "data": None if fingerprints is None else hashlib.sha256(json.dumps(
                fingerprints, sort_keys=True).encode()).hexdigest()[:8]}


def _column_names(identities: dict[str, dict], task: str) -> dict[str, str]:
    """Column keys for one task's identities: the task's name alone, or with what tells each apart."""
    if len(identities) == 1:
        return {key: task for key in identities}
    settings = {k for ident in identities.values() for k in ident["settings"]
                if len({json.dumps(i["settings"].get(k)) for i in identities.values()}) > 1}
    names = {}
    for key, ident in identities.items():
        parts = [f"{k}={ident['settings'].get(k)}" for k in sorted(settings)]
        if len({i["version"] for i in identities.values()}) > 1:
            parts.append("older records" if ident["version"] is None else f"task v{ident['version']}")
        if len({i["data"] for i in identities.values()}) > 1 and ident["version"] is not None:
            parts.append(f"data {ident['data']}")
        names[key] = f"{task} · {', '.join(parts)}"
    return names


def build(records: list[dict], reference: str | None = None) -> list[Group]:
    """One group per (backbone fingerprint, hardware, precision); rows by method settings; one column per task
    and identity (:func:`task_identity`): scores of other data, settings or loader versions never pool. Each row
    trained with a trick is compared with its method's plain row (:func:`_references`), or, with ``reference``
    (a row label), every row with that row."""
    groups: dict[tuple, Group] = {}
    known: dict[tuple, set] = {}  # (name, hardware, precision) -> the fingerprints its records hold
    for r in records:
        if (r.get("backbone") or {}).get("fingerprint"):
            known.setdefault(_where(r), set()).add(r["backbone"]["fingerprint"])
    for r in records:
        cfg = r["config"]
        backbone = r.get("backbone") or {}
        name = cfg["model"]["name_or_path"]
        fingerprint = backbone.get("fingerprint")
        if fingerprint is None and len(known.get(_where(r), ())) == 1:  # failed before the backbone loaded
            fingerprint = next(iter(known[_where(r)]))
        key = (fingerprint or f"path:{name}", hardware(r["env"]), cfg["train"]["mixed_precision"])
        group = groups.setdefault(key, Group(fingerprint, key[1], key[2], name,
                                             backbone.get("random_init", name == "tiny")))
        group.pretrained = group.pretrained or backbone.get("pretrained_by_peftbench")
        if r.get("provenance", {}).get("phase") == "search":
            group.search.append(r)
        else:
            identity, label, plain, tricks = _settings(r)
            method = "ensemble" if identity[0] == "ensemble" else cfg["method"]["name"]
            row = group.rows.setdefault(identity, Row(method, label, plain=plain, tricks=tricks))
            row.records.append(r)
            if r.get("provenance", {}).get("command"):
                group.reproduce.add(re.sub(r" --shard \d+/\d+", "", r["provenance"]["command"]))  # shards: one sweep
    for group in groups.values():
        _tell_rows_apart(group)
        _columns(group)
        _references(group, reference)
    _tell_apart(list(groups.values()))
    return [groups[k] for k in sorted(groups) if groups[k].rows]  # a search still running has no rows yet


def _tell_rows_apart(group: Group) -> None:
    """Rows whose labels match but whose settings do not (labels leave out most ``train.*`` keys: epochs, batch
    size, ...) each name the settings they differ in; marks and references, keyed by label, stay apart."""
    by_label: dict[str, list] = {}
    for identity, row in group.rows.items():
        if identity[0] != "ensemble":
            by_label.setdefault(row.label, []).append((identity, row))
    for same in by_label.values():
        if len(same) < 2:
            continue
        flat = [{f"{section}.{k}": v for section, part in zip(("method", "train", "model"), identity[1:4])
                 for k, v in json.loads(part).items()} for identity, _ in same]
        differ = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1)
        for values, (_, row) in zip(flat, same):
            words = ", ".join(f"{k}={values.get(k, 'unset')}" for k in differ)
            row.settings = f"{row.settings}, {words}" if row.settings else words


def _where(record: dict) -> tuple:
    """The group of a record before fingerprints: backbone path, hardware, precision."""
    config = record["config"]
    return config["model"]["name_or_path"], hardware(record["env"]), config["train"]["mixed_precision"]


def _columns(group: Group) -> None:
    """The group's columns (task and identity), each with its split, metric and baselines; every row's cells."""
    identities: dict[str, dict[str, dict]] = {}
    unread = [r for r in group.records if r["status"] == "failed" and "data" not in r]  # failed before its data
    for r in group.records + group.search:
        if not any(r is u for u in unread):
            ident = task_identity(r)
            identities.setdefault(r["config"]["task"]["name"], {})[json.dumps(ident, sort_keys=True)] = ident
    for r in unread:
        ident, task = task_identity(r), r["config"]["task"]["name"]
        same = [k for k, i in identities.get(task, {}).items() if i["settings"] == ident["settings"]]
        if len(same) != 1:
            identities.setdefault(task, {})[json.dumps(ident, sort_keys=True)] = ident
    names = {(task, key): name for task, found in identities.items()
             for key, name in _column_names(found, task).items()}
    for r in group.records + group.search:
        task, key = r["config"]["task"]["name"], json.dumps(task_identity(r), sort_keys=True)
        if (task, key) not in names:  # a run that failed before its data loaded: the column of its settings
            key = next(k for k, i in identities[task].items() if i["settings"] == task_identity(r)["settings"])
        group.columns[id(r)] = names[task, key]
    group.tasks = sorted({group.task_of(r) for r in group.records})
    for row in group.rows.values():
        for r in row.records:
            if r.get("provenance", {}).get("phase") == "final":
                lr = r["config"]["train"]["lr"]
                row.chosen_lr[group.task_of(r)] = lr
                row.lr_edge[group.task_of(r)] = range_edge(lr, r["provenance"].get("budget", {}).get("lr_range"))
                row.chosen_settings[group.task_of(r)] = r["provenance"].get("chosen_settings", {})
    for task in group.tasks:
        ok = [r for r in group.records if group.task_of(r) == task and r["status"] == "success"]
        group.split[task] = "test" if ok and all("test_score" in r["metrics"] for r in ok) else "dev"
        group.metric[task] = ok[0]["metrics"]["score_name"] if ok else "accuracy"
        found = [r["baselines"][group.split[task]] for r in ok if group.split[task] in r.get("baselines", {})]
        if found:
            group.baselines[task] = found[0]
    for row in group.rows.values():
        for r in row.records:
            if r.get("interrupted"):  # cut short from outside: still to run, not a failure of the method
                continue
            task = group.task_of(r)
            cell = row.cells.setdefault(task, Scores())
            if r["status"] == "success":
                cell.scores.append(r["metrics"]["test_score" if group.split[task] == "test" else "score"])
            else:
                cell.failures.append("OOM" if "out of memory" in r.get("error", "").lower() else "failed")


def _references(group: Group, chosen: str | None) -> None:
    """Which row each row's differences are taken to: the row labelled ``chosen`` for every other row, or, for a
    row trained with a trick, the one row of the same method and settings without any (at any learning rate:
    a trick row runs at the rate the search chose for the plain row)."""
    rows = list(group.rows.values())
    if chosen is not None:
        reference = next((row for row in rows if row.label == chosen), None)
        group.references = {row.label: reference for row in rows if reference and row is not reference}
        return
    for row in rows:
        plain = [other for other in rows if other.plain == row.plain and not other.tricks]
        if row.tricks and len(plain) == 1:
            group.references[row.label] = plain[0]


def _tell_apart(groups: list[Group]) -> None:
    """Backbones of one name but other fingerprints (two pretraining runs saved to one folder) get the first
    digits of their fingerprints after their names."""
    by_name: dict[str, set] = {}
    for group in groups:
        by_name.setdefault(group.display_name, set()).add(group.fingerprint)
    for group in groups:
        if len(by_name[group.display_name]) > 1:
            group.tag = f" ({group.fingerprint[:8] if group.fingerprint else 'no fingerprint'})"


def range_edge(lr: float, lr_range: list[float] | None) -> str:
    """"↑" or "↓" when ``lr`` is the top or bottom of the search range (the best rate may lie beyond it)."""
    if not lr_range:
        return ""
    if math.isclose(lr, lr_range[1], rel_tol=1e-2):
        return "↑"
    return "↓" if math.isclose(lr, lr_range[0], rel_tol=1e-2) else ""
