"""Marks and differences: a gap the test sample alone can make is not marked; a trick row against its
method's plain row, and every row against a chosen reference row, with 95 % intervals."""

import csv
import json

import pytest
from test_leaderboard import record, stamped

from peftbench import leaderboard
from peftbench.errors import PeftbenchError
from peftbench.records import write_atomic


def with_examples(root, name, method, seed, correct: list[int], **kw):
    """A record of ``method`` holding its per-example results on one 1,772-example test split (bustm's size)."""
    acc = sum(correct) / len(correct)
    rec = stamped(root, name, "f", seed=seed, acc=acc, method=method, **kw)
    rec["per_example"] = {"test": {"metric": "accuracy", "n": len(correct), "ids_sha256": "same examples",
                                   "values": "".join(map(str, correct))}}
    write_atomic(next((root / name).rglob("record.json")), rec)
    return rec


def test_a_gap_the_test_sample_alone_can_make_is_not_marked(tmp_path):
    """bustm's case: two rows 2 points apart whose seeds agree within 0.5 points. Welch's t-test over the seeds
    calls the gap significant; the paired bootstrap over the 1,772 test examples and the seeds does not. A gap
    of 15 points stays significant under both."""
    import random

    rng, n = random.Random(0), 1772
    def draws(p):  # noqa: E306
        return [int(rng.random() < p) for _ in range(n)]
    rows = {"lora": draws(0.608), "adapter": draws(0.587), "prefix": draws(0.46)}
    for method, base in rows.items():
        for seed in (1, 2, 3):  # each seed flips a few examples of the method's own pattern
            correct = [1 - c if rng.random() < 0.004 else c for c in base]
            with_examples(tmp_path / method, f"s{seed}", method, seed, correct)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    cells = {row.method: row.cells["tnews"] for row in group.rows.values()}
    assert cells["lora"].mean - cells["adapter"].mean > 0.01 and max(c.std for c in cells.values()) < 0.006
    from peftbench.leaderboard.significance import examples, interval, welch_p

    assert welch_p(cells["lora"].scores, cells["adapter"].scores) < 0.05  # seeds alone: "significant"
    marks = {label.split(" ")[0]: mark for (label, _), mark in leaderboard.significance(group).items()}
    assert marks == {"lora": "★", "adapter": "☆"}  # adapter not shown worse; prefix 15 points below: no mark
    by_method = {row.method: row for row in group.rows.values()}
    low, high = interval(group, by_method["lora"], "tnews")
    assert low < cells["lora"].mean < high and 0.03 < high - low < 0.06  # about ±1.2 points on 1,772 examples
    assert examples(group, by_method["lora"], "tnews")[1].shape == (3, n)
    lines = list(csv.DictReader(leaderboard.csv_text([group]).splitlines()))
    assert len(lines) == 3 and all(float(r["ci95_low"]) < float(r["mean"]) < float(r["ci95_high"]) for r in lines)
    page = leaderboard.html_page([group], group.records, {}, leaderboard.sources([tmp_path]))
    assert page.count("title='95 % interval") == 3


def test_each_trick_row_shows_its_difference_to_its_methods_plain_row(tmp_path):
    """A trick that changes nothing has an interval around 0 and no mark; one that lifts every seed by ten points
    is marked ▲ with an interval above 0; a row's time per example is shown against the plain row's."""
    import random

    rng, n = random.Random(1), 1772
    plain = [int(rng.random() < 0.6) for _ in range(n)]
    better = [1 if c or rng.random() < 0.25 else 0 for c in plain]  # about +10 points, on the same examples
    rows = {"plain": ([], plain), "smooth": (["train.label_smoothing=0.1"], plain),
            "fgm": (["train.adversarial=fgm", "train.lr=1e-3"], better)}
    for name, (extra, base) in rows.items():
        for seed in (1, 2, 3):
            correct = [1 - c if rng.random() < 0.004 else c for c in base]
            with_examples(tmp_path / name, f"s{seed}", "lora", seed, correct, extra=extra)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    by_name = {("fgm" if "adversarial" in r.label else "smooth" if "smoothing" in r.label else "plain"): r
               for r in group.rows.values()}
    assert {label: ref.label for label, ref in group.references.items()} == {
        by_name["smooth"].label: by_name["plain"].label, by_name["fgm"].label: by_name["plain"].label}
    from peftbench.leaderboard.significance import difference

    same = difference(group, by_name["smooth"], by_name["plain"], "tnews")
    lifted = difference(group, by_name["fgm"], by_name["plain"], "tnews")
    assert same["test"] == lifted["test"] == "paired bootstrap"
    assert same["low"] < 0 < same["high"] and same["high"] - same["low"] < 0.02 and same["p"] > 0.05
    assert 0.08 < lifted["low"] < lifted["diff"] < lifted["high"] < 0.12 and lifted["p"] < 0.01
    page = leaderboard.markdown([group], group.records, {}, [], leaderboard.sources([tmp_path]))
    against = page.split("Against a reference row")[1]
    assert f"{100 * lifted['diff']:+.1f} \\[{100 * lifted['low']:+.1f}, {100 * lifted['high']:+.1f}\\] ▲" in against
    table = against.split("| method | against |")[1]
    assert "×1.00" in table and "▼" not in table
    lines = {r["settings"]: r for r in csv.DictReader(leaderboard.csv_text([group]).splitlines())}
    assert lines[by_name["plain"].settings]["reference"] == ""
    assert float(lines[by_name["fgm"].settings]["diff_ci95_low"]) > 0.08
    cells = json.loads(leaderboard.json_text([group], group.records, []))["tables"][0]["cells"]
    assert {c["row"]: (c["against"] or {}).get("row") for c in cells}[by_name["smooth"].label] == by_name["plain"].label


def test_a_trick_rows_train_time_is_shown_only_where_the_cpu_runs_vouch_for_their_speed(tmp_path):
    """On CPU the train-time ratio needs every run of both rows to have had its core (train_cpu_share recorded,
    and 0.8 or more for one thread): older records or a run beside another job blank it. Rows of a sweep's final
    variants say that they ran at the plain row's searched rate."""
    from peftbench.leaderboard.table import reference_table

    cpu = {"device_name": "AMD EPYC", "device": "cpu", "num_processes": 1, "torch_threads": 1}
    for extra in ((), ("train.label_smoothing=0.1",)):
        for seed in (1, 2, 3):
            record(tmp_path, "bert-base-chinese", "lora", "tnews", seed, 0.6, env=cpu, extra=extra)

    def edit(change):
        for path in tmp_path.rglob("record.json"):
            rec = json.loads(path.read_text())
            change(rec)
            write_atomic(path, rec)

    def against():
        (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
        note, head, (row,) = reference_table(group)
        return note, row[head.index("train time")]

    note, time = against()
    assert time == "—" and "recorded no train_cpu_share" in note and "final variants" not in note
    edit(lambda r: r["metrics"].update(train_cpu_share=0.95))
    assert against()[1] == "×1.00"
    edit(lambda r: r["metrics"].update(train_cpu_share=0.5 if r["config"]["train"]["seed"] == 2 else 0.95))
    assert against()[1] == "—"
    edit(lambda r: (r["metrics"].update(train_cpu_share=0.95),
                    r["provenance"].update(variant="smoothing" if r["config"]["train"]["label_smoothing"] else None)))
    note, time = against()
    assert time == "×1.00" and "each ran at the learning rate the search chose for its plain row" in note


def test_a_chosen_reference_row_compares_every_other_row_and_an_unknown_one_is_refused(tmp_path):
    for method, acc in (("lora", 0.6), ("full", 0.7)):
        for seed in (1, 2, 3):
            record(tmp_path / "r", "bert-base-chinese", method, "tnews", seed, acc + seed / 100)
    out = tmp_path / "board"
    label = "lora (lr=0.0005)"
    leaderboard.write([tmp_path / "r"], out, reference=label)
    page = (out / "leaderboard.md").read_text(encoding="utf-8")
    table = page.split("| method | against |")[1]
    assert "| full (lr=2e-05) | lora (lr=0.0005) | +10.0 \\[" in table and "▲" in table  # Welch over seeds
    with pytest.raises(PeftbenchError, match="--reference 'lora': no table has a row of this label.*lora \\(lr"):
        leaderboard.write([tmp_path / "r"], out, reference="lora")
