import csv
import html
import json
import re
import statistics
from pathlib import Path

import pytest

from peftbench import config, leaderboard
from peftbench.errors import PeftbenchError
from peftbench.records import make_record, write_atomic

ENV = {"device_name": "Test GPU", "num_processes": 1}


def record(root, backbone, method, task, seed, acc, status="success", env=ENV, error=None, lr=None, extra=()):
    cfg = config.load(None, [f"model.name_or_path={backbone}", f"method.name={method}", f"task.name={task}",
                             f"train.seed={seed}", *extra] + ([f"train.lr={lr}"] if lr else []))
    metrics = {"score": acc - 0.01, "test_score": acc, "score_name": "accuracy", "n_eval": 100,
               "train_samples_per_s": 100.0 * (2 if method == "lora" else 1), "train_tokens_per_s": 2000.0,
               "eval_samples_per_s": 500.0, "peak_memory_mb": 1000.0 if method == "full" else 400.0, "wall_s": 1.0}
    params = {"trainable": 1_000_000 if method == "full" else 10_000, "total": 1_000_000,
              "trainable_pct": 100.0 if method == "full" else 1.0, "adapter_bytes": 4_000}
    rec = make_record(status, cfg.to_dict(), cfg.run_id, dict(env), metrics if status == "success" else {},
                      params if status == "success" else {}, error=error,
                      extra={"backbone": {"name_or_path": backbone, "random_init": backbone == "tiny"},
                             "settings": cfg.changed_settings(),
                             "provenance": {"command": "peftbench sweep s.yaml"}, **serving_cost(method, seed),
                             "baselines": {"test": BASELINES[task], "dev": {"chance": 0.5, "majority": 0.5}}})
    rec["finished_at"] = f"2026-01-0{seed}T00:00:00+00:00"
    write_atomic(root / f"{backbone}-{method}-{task}-{seed}-{env['device_name']}-{len(extra)}" / "record.json", rec)
    return rec


BASELINES = {"tnews": {"chance": 1 / 15, "majority": 0.1234}, "afqmc": {"chance": 0.5, "majority": 0.69},
             "cluener": {"chance": None, "majority": 0.0}}


def serving_cost(method, seed):
    """The record's inference cost: LoRA merges, full has nothing to merge, prefix's record predates it."""
    if method == "prefix":
        return {}
    cost = {"split": "test", "as_trained": {"latency_ms_p50": 2.0 * seed, "samples_per_s": 100.0 * seed},
            "flops_per_sample": 1.5e12 if method == "lora" else 1e12, "base_flops_per_sample": 1e12}
    if method == "lora":
        cost["merged"] = {"latency_ms_p50": 1.0 * seed, "samples_per_s": 150.0 * seed}
    return {"inference": cost}


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    accs = {("full", "tnews"): [0.50, 0.52, 0.54], ("lora", "tnews"): [0.49, 0.53, 0.55],
            ("prefix", "tnews"): [0.30, 0.31, 0.29], ("full", "afqmc"): [0.70, 0.70, 0.72],
            ("lora", "afqmc"): [0.69, 0.71, 0.70], ("prefix", "afqmc"): [0.60, 0.61, 0.62]}
    for (method, task), values in accs.items():
        for seed, acc in enumerate(values, 1):
            record(root, "bert-base-chinese", method, task, seed, acc)
    record(root, "bert-base-chinese", "adapter", "tnews", 1, 0, status="failed",
           error="OutOfMemoryError: CUDA out of memory")
    record(root, "bert-base-chinese", "adapter", "afqmc", 1, 0, status="failed", error="RuntimeError: boom")
    record(root, "tiny", "lora", "tnews", 1, 0.9)
    record(root, "tiny", "full", "tnews", 1, 0.95)
    record(root, "bert-base-chinese", "full", "tnews", 1, 0.99, env={"device_name": "Other GPU", "num_processes": 1})
    return root, accs


def test_groups_rows_and_aggregation(results):
    root, accs = results
    groups = leaderboard.build(leaderboard.collect([root])[0])
    assert [(g.backbone, g.hardware) for g in groups] == [
        ("bert-base-chinese", "Other GPU ×1"), ("bert-base-chinese", "Test GPU ×1"), ("tiny", "Test GPU ×1")]
    main = groups[1]
    assert main.tasks == ["afqmc", "tnews"] and main.split == {"afqmc": "test", "tnews": "test"}
    head, rows = leaderboard.table(main)
    by_method = {r[0].split(" ")[0]: r for r in rows}
    tnews = head.index("tnews (test)")
    mean, std = statistics.fmean(accs[("full", "tnews")]), statistics.stdev(accs[("full", "tnews")])
    assert by_method["full"][tnews].startswith(f"{100 * mean:.1f} ± {100 * std:.1f} (3)")
    average = statistics.fmean([statistics.fmean(accs[("full", t)]) for t in ("tnews", "afqmc")])
    assert by_method["full"][head.index("average")] == f"{100 * average:.1f}"
    assert by_method["adapter"][tnews] == "OOM" and by_method["adapter"][head.index("afqmc (test)")] == "failed"
    assert by_method["adapter"][head.index("average")] == "—"
    assert by_method["lora"][head.index("trainable")] == "10.00K"
    latency, speed = head.index("latency ms p50 (merged)"), head.index("infer samples/s (merged)")
    assert by_method["lora"][latency] == "4.00 (2.00)" and by_method["lora"][speed] == "200 (300)"  # seeds 1-3
    assert by_method["full"][latency] == "4.00" and by_method["prefix"][latency] == "—"
    assert by_method["adapter"][latency] == "—"  # failed runs measure nothing
    chance, majority = rows[-2], rows[-1]  # after the methods, unranked, on the evaluated split (test)
    assert chance[:3] == ["chance (uniform guess)", "50.0", "6.7"] and set(chance[3:]) == {"—"}
    assert majority[:3] == ["majority class", "69.0", "12.3"] and set(majority[3:]) == {"—"}
    assert not any(mark in cell for row in rows[-2:] for cell in row for mark in "★☆")


def test_significance_marks(results):
    root, _ = results
    groups = leaderboard.build(leaderboard.collect([root])[0])
    head, rows = leaderboard.table(groups[1])
    by_method = {r[0].split(" ")[0]: r for r in rows}
    tnews, afqmc = head.index("tnews (test)"), head.index("afqmc (test)")
    assert by_method["lora"][tnews].endswith("★")  # best mean 52.3 vs full 52.0
    assert by_method["full"][tnews].endswith("☆")  # not significantly worse
    assert by_method["prefix"][tnews].endswith("(3)")  # clearly worse: unmarked
    assert by_method["full"][afqmc].endswith("★") and by_method["lora"][afqmc].endswith("☆")
    _, tiny_rows = leaderboard.table(groups[2])
    assert not any("★" in c or "☆" in c for r in tiny_rows for c in r)  # random init: never ranked


def test_a_table_cut_short_leaves_the_last_whole_one(results, tmp_path, monkeypatch):
    """A full disk while the tables are written: each file is the last whole one, and no temp file is left."""
    import os

    root, _ = results
    files, _ = leaderboard.write([root], tmp_path / "board")
    before = {f.name: f.read_bytes() for f in files}

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        leaderboard.write([root / "bert-base-chinese-lora-tnews-1-Test GPU-0"], tmp_path / "board")  # other text
    assert {f.name: f.read_bytes() for f in files} == before
    assert not [p for p in (tmp_path / "board").iterdir() if p.name.startswith(".")]  # no temp file


def test_outputs_are_byte_identical_and_self_contained(results, tmp_path):
    root, _ = results
    a, _ = leaderboard.write([root], tmp_path / "a")
    b, _ = leaderboard.write([root], tmp_path / "b")
    for fa, fb in zip(a, b):
        assert fa.read_bytes() == fb.read_bytes(), fa.name
    md = (tmp_path / "a" / "leaderboard.md").read_text(encoding="utf-8")
    assert "random init: not a ranking" in md and "Reproduce: `peftbench sweep s.yaml`" in md
    assert "newest 2026-01-03T00:00:00+00:00" in md and "Welch" in md
    page = (tmp_path / "a" / "leaderboard.html").read_text(encoding="utf-8")
    assert "http:" not in page and "https:" not in page  # base64 has no ':', so any hit would be a URL
    assert all(v.startswith("data:") for v in re.findall(r"(?:src|href)='([^']*)'", page))
    assert page.count("<table>") == 3 and page.count("data:image/png;base64,") == 9
    for kind in ("accuracy-vs-params", "accuracy-vs-memory", "throughput"):
        for ext in ("png", "svg"):
            assert len(list((tmp_path / "a").glob(f"*-{kind}.{ext}"))) == 3
    rows = list(csv.DictReader((tmp_path / "a" / "leaderboard.csv").open(encoding="utf-8")))
    failed = [r for r in rows if r["method"] == "adapter"]
    assert {r["failed"] for r in failed} == {"1"} and {r["mean"] for r in failed} == {""}


def test_pareto_front():
    assert leaderboard.pareto([(10, 50), (1, 40), (5, 45), (20, 48), (2, 30)]) == [(1, 40), (5, 45), (10, 50)]


def test_ner_scores_are_entity_f1_and_count_in_the_average(tmp_path):
    root = tmp_path / "results"
    for seed in (1, 2, 3):
        record(root, "bert-base-chinese", "lora", "tnews", seed, 0.5)
        rec = record(root, "bert-base-chinese", "lora", "cluener", seed, 0.7)
        rec["metrics"]["score_name"] = "entity_f1"
        write_atomic(next(root.glob(f"*cluener-{seed}-*")) / "record.json", rec)
    (group,) = leaderboard.build(leaderboard.collect([root])[0])
    head, rows = leaderboard.table(group)
    assert "cluener (test, F1)" in head and "tnews (test)" in head
    assert rows[0][head.index("average")] == "60.0"
    chance, majority = rows[-2:]  # NER: no chance figure; the majority tag (O) finds no entity
    assert chance[head.index("cluener (test, F1)")] == "—" and majority[head.index("cluener (test, F1)")] == "0.0"


def test_quantised_runs_are_their_own_rows(tmp_path):
    for seed in (1, 2, 3):
        record(tmp_path, "bert-base-chinese", "lora", "tnews", seed, 0.55)
        record(tmp_path, "bert-base-chinese", "lora", "tnews", seed, 0.50, extra=("model.quantization=8bit",))
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    labels = sorted(row.label for row in group.rows.values())
    assert labels == ["lora (8-bit base, lr=0.0005)", "lora (lr=0.0005)"]  # precision in words; LoRA's rate
    assert all(len(row.cells["tnews"].scores) == 3 for row in group.rows.values())


def test_keys_that_change_no_result_split_no_row_and_cut_short_runs_are_left_out(tmp_path):
    """Seeds run with and without resumable states, or with another timeout, are one row; a run cut short from
    outside (a lost process: it runs again) is neither a score nor a failure."""
    for seed, extra in ((1, ()), (2, ("train.save_state_every=50", "train.resume=true")),
                        (3, ("train.dist_timeout=60", "train.measure_inference=false"))):
        record(tmp_path, "bert-base-chinese", "lora", "tnews", seed, 0.55, extra=extra)
    cut = record(tmp_path, "bert-base-chinese", "lora", "tnews", 4, 0.5, status="failed",
                 error="LostProcess: process 0 of 2 lost another process of the group", extra=("train.resume=true",))
    cut["interrupted"] = True
    write_atomic(tmp_path / f"bert-base-chinese-lora-tnews-4-{ENV['device_name']}-1" / "record.json", cut)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    (row,) = group.rows.values()
    assert len(row.cells["tnews"].scores) == 3 and not row.cells["tnews"].failures


def test_pscp_is_the_average_with_peft_bench_penalties(tmp_path):
    for seed in (1, 2, 3):
        for task, acc in (("tnews", 0.5), ("afqmc", 0.7)):
            wobble = 0.01 * (seed - 2)  # mean over the seeds: acc
            record(tmp_path, "bert-base-chinese", "lora", task, seed, acc + wobble)
            record(tmp_path, "bert-base-chinese", "full", task, seed, acc + 0.1 + wobble)
            record(tmp_path, "bert-base-chinese", "prefix", task, seed, acc + wobble)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    head, rows = leaderboard.table(group)
    pscp = {row[0].split(" ")[0]: row[head.index("PSCP")] for row in rows}
    # PSCP = P x (1 + params/5e8)^-1 x (1 + extra TFLOPs/10)^-1 x (1 + peak GiB/94)^-1 (PEFT-Bench's constants)
    lora = 60.0 / (1 + 1e4 / 5e8) / (1 + 0.5 / 10) / (1 + 400 / 1024 / 94)
    full = 70.0 / (1 + 1e6 / 5e8) / (1 + 0 / 10) / (1 + 1000 / 1024 / 94)
    assert pscp["lora"] == f"{lora:.1f}" and pscp["full"] == f"{full:.1f}"
    assert pscp["prefix"] == "—"  # its records carry no inference cost: no PSCP rather than a guess


def test_section_header_names_budget_precision_backbone_and_cpu_memory(tmp_path):
    pretrained = {"run_id": "abcdef1234567890", "corpus": ["unlabeled.json"], "steps": 4000, "mlm_loss": 4.2,
                  "device": "cpu"}
    for seed in (1, 2):
        for task in ("tnews", "afqmc"):
            rec = record(tmp_path, "runs/pretrain/zh-mini/model", "lora", task, seed, 0.6,
                         env={"device_name": "cpu", "num_processes": 1},
                         extra=("train.mixed_precision=bf16", "train.epochs=10", "train.batch_size=16",
                                f"task.max_length={64 if task == 'tnews' else 128}"))
            rec["backbone"]["pretrained_by_peftbench"] = pretrained
            rec["metrics"]["memory_kind"] = "cpu_peak_rss"
            write_atomic(next(tmp_path.rglob(f"*lora-{task}-{seed}-*")) / "record.json", rec)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert group.title == "zh-mini (pretrained by peftbench, run abcdef12) · cpu ×1 · bf16 mixed"
    assert group.budget == "10 epochs · batch 16 · max length afqmc 128, tnews 64 · seeds 1, 2"
    assert "peak resident memory of the CPU process" in group.memory_note
    text = leaderboard.markdown([group], group.records, {}, [], leaderboard.sources([tmp_path]))
    assert f"Budget: {group.budget}." in text and group.memory_note in text and "runs/pretrain" not in text



def test_a_row_searched_under_two_budgets_says_so_and_the_json_holds_the_choices(tmp_path):
    """LoRA's tnews runs were searched with 3 grid trials, its afqmc runs with 4 TPE trials over another range:
    the row pools them and a footnote says so (``--strict`` refuses it); full, searched alike (its warm-up
    too), gets none. The JSON cells hold what the search chose."""
    budgets = {"tnews": {"trials": 3, "sampler": "grid", "lr_range": [1e-4, 3e-2], "seeds": [1]},
               "afqmc": {"trials": 4, "sampler": "tpe", "lr_range": [1e-5, 1e-2], "seeds": [1]},
               "full": {"trials": 4, "sampler": "tpe", "lr_range": [1e-5, 1e-3], "seeds": [1],
                        "space": {"train.warmup_ratio": {"low": 0.0, "high": 0.2}}}}
    for method in ("lora", "full"):
        for task in ("tnews", "afqmc"):
            for seed in (1, 2, 3):
                rec = record(tmp_path, "bert-base-chinese", method, task, seed, 0.6 + seed / 100, lr=3e-3)
                budget = budgets[task if method == "lora" else method]
                rec["provenance"] = {"phase": "final", "budget": {**budget, "final_seeds": [1, 2, 3]},
                                     "chosen_lr": 3e-3, **({"chosen_settings": {"train.warmup_ratio": 0.1}}
                                                           if "space" in budget else {})}
                write_atomic(next(tmp_path.glob(f"*-{method}-{task}-{seed}-*")) / "record.json", rec)
    records = leaderboard.collect([tmp_path])[0]
    (group,) = leaderboard.build(records)
    assert group.footnotes == ["lora (lr tuned) pools runs searched under 2 budgets: 3 trials (grid, lr 0.0001-0.03, "
                               "seeds 1) (tnews); 4 trials (tpe, lr 1e-05-0.01, seeds 1) (afqmc)"]
    assert "searched: 3/4 trials per method (grid/tpe" in group.budget
    with pytest.raises(PeftbenchError, match="pools runs searched under 2 budgets"):
        leaderboard.write([tmp_path], tmp_path / "board", strict=True)
    cells = {(c["method"], c["column"]): c for c in json.loads(
        leaderboard.json_text([group], records, leaderboard.sources([tmp_path])))["tables"][0]["cells"]}
    assert cells["lora", "afqmc"]["chosen"] == {"lr": 3e-3}
    assert cells["full", "tnews"]["chosen"] == {"lr": 3e-3, "train.warmup_ratio": 0.1}
    rec = json.loads(next(tmp_path.glob("*-lora-tnews-3-*/record.json")).read_text(encoding="utf-8"))
    rec["config"]["train"]["lr"] = 1e-3  # one seed's search chose another rate: the cell pools two choices
    write_atomic(next(tmp_path.glob("*-lora-tnews-3-*")) / "record.json", rec)
    records = leaderboard.collect([tmp_path])[0]
    cells = {(c["method"], c["column"]): c for c in json.loads(leaderboard.json_text(
        leaderboard.build(records), records, leaderboard.sources([tmp_path])))["tables"][0]["cells"]}
    assert cells["lora", "tnews"]["chosen"] == [{"lr": 3e-3}, {"lr": 1e-3}]


def test_rows_whose_cpu_runs_shared_their_cores_are_named_beside_the_speed(tmp_path):
    """A one-thread run whose train_cpu_share is below 0.8 (another job beside it) makes its row's samples/s
    suspect: the page names the row, how many of its successful runs and their tasks; shares of 0.8 and above,
    records without one, and runs of several threads or an unknown number (lower alone: serial parts) say
    nothing."""
    def share(method, task, seed, value, threads=1):
        path = next(tmp_path.rglob(f"*{method}-{task}-{seed}-*")) / "record.json"
        rec = json.loads(path.read_text())
        rec["metrics"]["train_cpu_share"] = value
        if threads is not None:
            rec["env"]["torch_threads"] = threads
        write_atomic(path, rec)

    for method in ("lora", "full", "prefix"):
        for task in ("tnews", "afqmc"):
            for seed in (1, 2):
                record(tmp_path, "bert-base-chinese", method, task, seed, 0.6)
    record(tmp_path, "bert-base-chinese", "lora", "tnews", 3, 0.6, status="failed", error="boom")
    share("lora", "tnews", 1, 0.99), share("lora", "tnews", 2, 0.45), share("lora", "afqmc", 1, 0.5)
    share("full", "tnews", 1, 0.8), share("full", "tnews", 2, 0.5, threads=None)  # full afqmc: none recorded
    share("prefix", "tnews", 1, 0.6, threads=2)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    named = group.speed_note.split("so they read low: ")[1]
    assert named.startswith("lora") and named.endswith(": 2 of 4 runs (afqmc, tnews).")
    assert "full" not in named and "prefix" not in named
    found = leaderboard.sources([tmp_path])
    assert group.speed_note in leaderboard.markdown([group], group.records, {}, [], found)
    assert html.escape(group.speed_note) in leaderboard.html_page([group], group.records, {}, found)
    share("lora", "tnews", 2, 0.8), share("lora", "afqmc", 1, 0.8)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert group.speed_note is None


def test_record_text_cannot_break_out_of_its_markdown_cell(tmp_path):
    """A record's string fields (here the method name) stay inside their cell: no new line, no heading, no live
    link, whatever they hold."""
    import json

    root = tmp_path / "results"
    injected = "x\n## heading\n[link](javascript:alert(2))\r\x1b[31m|"
    for seed in (1, 2):
        rec = record(root, "bert-base-chinese", "lora", "tnews", seed, 0.5)
        path = next(p for p in root.rglob("record.json") if json.loads(p.read_text())["run_id"] == rec["run_id"])
        rec["config"]["method"]["name"] = injected
        write_atomic(path, rec)
    text = (leaderboard.write([root], tmp_path / "lb")[0][0]).read_text(encoding="utf-8")
    assert "\x1b" not in text and "\r" not in text
    assert [line for line in text.splitlines() if line.startswith("#")] == ["# Leaderboard",
                                                                          "## bert-base-chinese · Test GPU ×1 · fp32"]
    assert not re.search(r"(?<!\\)\]\(", text.replace("](bert-base", ""))  # no link but the figures'
    (row,) = [line for line in text.splitlines() if "javascript" in line]
    assert row.startswith("| x\\n## heading\\n\\[link\\](javascript:alert(2))\\r\\x1b\\[31m\\| (lr=")
    columns = next(line for line in text.splitlines() if line.startswith("|---")).count("---")
    assert len(re.findall(r"(?<!\\)\|", row)) == columns + 1  # the row's own cell borders, no more


def test_a_run_found_in_two_folders_counts_once(tmp_path):
    """Workers of one sweep write to separate folders; a failed cell retried by another worker leaves its failed
    record behind: the table counts the run once, its success."""
    failed = record(tmp_path / "a", "bert-base-chinese", "lora", "tnews", 1, 0, status="failed", error="Error: x")
    done = record(tmp_path / "b", "bert-base-chinese", "lora", "tnews", 1, 0.6, extra=["train.dist_timeout=900"])
    again = record(tmp_path / "c", "bert-base-chinese", "lora", "tnews", 1, 0.6)
    assert failed["run_id"] == done["run_id"] == again["run_id"]
    records, _ = leaderboard.collect([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert len(records) == 1 and records[0]["status"] == "success"
    cell = leaderboard.build(records)[0].rows
    assert [len(row.cells["tnews"].scores) for row in cell.values()] == [1]
    other = record(tmp_path / "d", "bert-base-chinese", "lora", "tnews", 1, 0.6,
                   env={"device_name": "Other GPU", "num_processes": 1})
    assert other["run_id"] == done["run_id"] and len(leaderboard.collect([tmp_path])[0]) == 2  # another machine


def stamped(root, name, backbone_fp, data_fp="d1", version=1, seed=1, acc=0.6, env=ENV, task="tnews", method="lora",
            **kw):
    """A record with the fingerprints and task version a run writes now."""
    rec = record(root / name, "runs/pretrain/zh-mini/model", method, task, seed, acc, env=env, **kw)
    rec["backbone"]["fingerprint"] = backbone_fp * 8
    rec["backbone"]["pretrained_by_peftbench"] = {"run_id": "726f3ac8aaaa", "corpus": ["a.json"], "steps": 4000,
                                                  "mlm_loss": 3.0, "device": "cpu"}
    if version is not None:
        rec["data"] = {"task_version": version, "fingerprints": {"train": {"file": "train.json", "sha256": data_fp}}}
    write_atomic(next((root / name).rglob("record.json")), rec)
    return rec


def printed_averages(page: str) -> list[dict[str, str]]:
    """Each Markdown table with an average column, in page order: row label -> its average cell."""
    tables, lines = [], page.splitlines() + [""]
    for i, line in enumerate(lines):
        if line.startswith("| method |") and "| average |" in line:
            column = [c.strip() for c in line.split("|")].index("average")
            end = next(j for j in range(i + 2, len(lines)) if not lines[j].startswith("| "))
            tables.append({cells[1].strip(): cells[column].strip() for cells in
                           (row.split("|") for row in lines[i + 2:end])})
    return tables


def test_the_clue_average_module_gives_every_committed_rows_average(tmp_path):
    """Every row of every committed table that has all its columns: the clue_average evaluate module over the
    row's cell means prints as the table's average column."""
    evaluate = pytest.importorskip("evaluate")
    from peftbench.evaluate_modules import module_path

    metric, checked = evaluate.load(module_path("clue_average")), 0
    for page in sorted((Path(__file__).resolve().parents[1] / "leaderboards").glob("*/leaderboard.json")):
        tables = json.loads(page.read_text(encoding="utf-8"))["tables"]
        printed = printed_averages(page.with_suffix(".md").read_text(encoding="utf-8"))
        assert len(printed) == len(tables), page
        for table, averages in zip(tables, printed):
            for row in table["rows"]:
                means = {c["column"]: c["mean"] for c in table["cells"] if c["row"] == row["row"]}
                if len(means) < len(table["columns"]) or None in means.values():
                    continue
                result = metric.compute(predictions=list(means.values()), references=list(means))
                assert f"{100 * result['clue_average']:.1f}" == averages[row["row"]], (page, row["row"])
                checked += 1
    assert checked >= 20
    with pytest.raises(ValueError, match="each task once"):
        metric.compute(predictions=[0.5, 0.6], references=["tnews", "tnews"])


COMMITTED = {"fewclue": ["leaderboards/fewclue-tiny/records", "leaderboards/fewclue-zh-mini-tuned/records"],
             "fewclue-zh-mini-ranges": ["leaderboards/fewclue-zh-mini-ranges/records"],
             "prefix-study": ["leaderboards/prefix-study/records"],
             "fewclue-tricks": ["leaderboards/fewclue-tricks/records"],
             "fewclue-zh-mini-tuners": ["leaderboards/fewclue-zh-mini-tuners/records"]}  # leaderboards/README.md


def test_rows_whose_labels_match_but_settings_differ_name_the_difference(tmp_path):
    """A label names the method's settings and the rate, not every train key: rows of other epochs or batch
    sizes say which, and their marks stay their own."""
    root = tmp_path / "results"
    for seed in (1, 2, 3):
        for folder, base, extra in (("a", 0.50, ["train.epochs=3"]), ("b", 0.60, ["train.epochs=10"]),
                                    ("c", 0.40, ["train.epochs=10", "train.batch_size=8"])):
            record(root / folder, "bert-base-chinese", "lora", "tnews", seed, base + seed / 100, extra=extra)
    (group,) = leaderboard.build(leaderboard.collect([root])[0])
    labels = sorted(row.label for row in group.rows.values())
    assert labels == ["lora (lr=0.0005, train.batch_size=32, train.epochs=10)",
                      "lora (lr=0.0005, train.batch_size=32, train.epochs=3)",
                      "lora (lr=0.0005, train.batch_size=8, train.epochs=10)"]
    page = leaderboard.markdown([group], leaderboard.collect([root])[0], {}, [], leaderboard.sources([root]))
    starred = [line for line in page.splitlines() if line.startswith("| lora") and "★" in line]
    assert len(starred) == 1 and "batch_size=32, train.epochs=10" in starred[0]  # not every row of one label


@pytest.mark.parametrize("board", COMMITTED)
def test_committed_leaderboards_regenerate_from_their_records(board, monkeypatch):
    """The committed tables are what the current code makes of the committed records (plots aside: the pages
    name the committed files)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    dirs, out = COMMITTED[board], root / "leaderboards" / board
    records, skipped = leaderboard.collect(dirs)
    groups = leaderboard.build(records)
    plots = {g.slug: sorted(p.stem for p in out.glob(f"{g.slug}-*.png")) for g in groups}
    found = leaderboard.sources(dirs)
    assert leaderboard.markdown(groups, records, plots, skipped, found) == \
        (out / "leaderboard.md").read_text(encoding="utf-8")
    assert leaderboard.csv_text(groups) == (out / "leaderboard.csv").read_text(encoding="utf-8")
    assert leaderboard.json_text(groups, records, found) == (out / "leaderboard.json").read_text(encoding="utf-8")
