import math
import multiprocessing
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from peftbench import leaderboard, search, sweep
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.leaderboard.grouping import range_edge
from peftbench.leaderboard.table import lr_table
from peftbench.records import RECORD_NAME, make_record, read_record, write_atomic

SWEEP = """\
recipe: {{model: {{name_or_path: tiny}}, task: {{max_length: 48}}, train: {{epochs: 1}}}}
grid:
  task.name: [synthetic]
  method.name: [full, lora]
search:
  trials: {trials}
  lr: {{full: [1e-5, 1e-3], lora: [1e-4, 3e-2]}}
  seeds: [1, 2]
  sampler: {sampler}
final:
  seeds: [1, 2, 3]
output_dir: {out}
"""
BEST = {"full": 1e-4, "lora": 3e-3}  # where the fake dev score peaks


def spec_at(tmp_path, trials=4, sampler="grid", **replace):
    text = SWEEP.format(trials=trials, sampler=sampler, out=tmp_path / "results")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return search.read_sweep(path)


def dev_score(method: str, lr: float, seed: int) -> float:
    return 0.9 - 0.1 * abs(math.log10(lr) - math.log10(BEST[method])) + 0.001 * seed


def fake_runner(log: Path, interrupt_at=None, fail_above=None, pause=0.0):
    """Stands in for train.run: a record whose dev score depends on the learning rate; every call is appended
    to ``log`` (one line per run id), so that runs can be counted across processes."""

    def runner(cfg, provenance=None):
        with log.open("a") as fh:
            fh.write(cfg.run_id + "\n")
        calls = len(log.read_text().split())
        if interrupt_at is not None and calls == interrupt_at:
            raise KeyboardInterrupt
        time.sleep(pause)
        path = f"{cfg.output_dir}/{RECORD_NAME}"
        extra = {"provenance": provenance}
        if fail_above is not None and cfg.train.lr > fail_above:
            write_atomic(path, make_record("failed", cfg.to_dict(), cfg.run_id, {}, error="DivergedError: nan",
                                           extra=extra))
            raise RuntimeError("diverged")
        metrics = dict.fromkeys(["n_eval", "train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s",
                                 "peak_memory_mb", "wall_s"], 1.0)
        metrics.update(score=dev_score(cfg.method.name, cfg.train.lr, cfg.train.seed), score_name="accuracy")
        if cfg.train.evaluate_test:
            metrics["test_score"] = metrics["score"] - 0.05
        record = make_record("success", cfg.to_dict(), cfg.run_id, {}, metrics,
                             {"trainable": 1, "total": 2, "adapter_bytes": 4}, extra=extra)
        write_atomic(path, record)
        return SimpleNamespace(record=record)

    return runner


def records_of(out: Path, phase: str) -> list[dict]:
    return [read_record(p) for p in sorted((out / phase).glob(f"*/{RECORD_NAME}"))]


def test_a_chosen_rate_at_the_end_of_its_range_is_marked():
    lrs = search.grid_lrs(1e-4, 3e-2, 4)
    assert [range_edge(lr, [1e-4, 3e-2]) for lr in lrs] == ["↓", "", "", "↑"]
    assert range_edge(3e-2, None) == ""  # a record from before ranges were recorded


def test_grid_learning_rates_are_log_spaced_inside_the_range():
    assert search.grid_lrs(1e-4, 3e-2, 4) == [1e-4, 6.69e-4, 4.48e-3, 3e-2]
    assert search.grid_lrs(1e-5, 1e-3, 3) == [1e-5, 1e-4, 1e-3]
    assert search.grid_lrs(1e-4, 1e-2, 1) == [1e-3]
    lrs = search.grid_lrs(1.2345e-4, 9.8765e-2, 5)
    assert lrs[0] >= 1.2345e-4 and lrs[-1] <= 9.8765e-2 and lrs == sorted(lrs)


def test_every_method_gets_the_same_budget_and_its_best_dev_lr_goes_to_the_final_seeds(tmp_path):
    spec = spec_at(tmp_path)
    out = Path(spec["output_dir"])
    studies = search.studies(spec)
    assert [s.cfg.method.name for s in studies] == ["full", "lora"]
    outcome, waiting, no_final = search.run_search(studies, spec["search"], runner=fake_runner(tmp_path / "calls"))
    assert waiting == no_final == [] and outcome.failed == 0
    found = records_of(out, "search")
    assert len(found) == 2 * 4 * 2  # methods x trials x seeds
    for method, (low, high) in {"full": (1e-5, 1e-3), "lora": (1e-4, 3e-2)}.items():
        mine = [r for r in found if r["config"]["method"]["name"] == method]
        assert sorted({r["config"]["train"]["lr"] for r in mine}) == search.grid_lrs(low, high, 4)
        assert Counter(r["config"]["train"]["seed"] for r in mine) == {1: 4, 2: 4}
        assert all(not r["config"]["train"]["evaluate_test"] and "test_score" not in r["metrics"]
                   and not r["config"]["train"]["save_checkpoint"] for r in mine)  # dev decides, test unseen
        assert {r["provenance"]["trial"] for r in mine} == {0, 1, 2, 3}
        assert all(r["provenance"]["phase"] == "search" and r["provenance"]["budget"]["trials"] == 4
                   and r["provenance"]["budget"]["lr_range"] == [low, high] for r in mine)
        best = max(search.grid_lrs(low, high, 4), key=lambda lr: dev_score(method, lr, 1))
        final = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == method]
        assert sorted(r["config"]["train"]["seed"] for r in final) == [1, 2, 3]
        assert all(r["config"]["train"]["lr"] == best == r["provenance"]["chosen_lr"] for r in final)
        assert all(r["provenance"]["phase"] == "final" and "test_score" in r["metrics"] for r in final)
        mean_dev = sum(dev_score(method, best, s) for s in (1, 2)) / 2
        assert final[0]["provenance"]["search_dev_score"] == pytest.approx(mean_dev)
    # a second pass finds everything done
    again = tmp_path / "again"
    outcome, *_ = search.run_search(search.studies(spec), spec["search"], runner=fake_runner(again))
    assert not again.exists() and outcome.ran == 0 and outcome.done_before == 2 * 3  # trials finished: final only


def test_a_killed_search_resumes_and_runs_every_cell_once(tmp_path):
    spec = spec_at(tmp_path)
    log = tmp_path / "calls"
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of a trial
        search.run_search(search.studies(spec), spec["search"], runner=fake_runner(log, interrupt_at=5))
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(log))
    calls = Counter(log.read_text().split())
    interrupted = [run_id for run_id, n in calls.items() if n == 2]
    assert len(interrupted) == 1 and max(calls.values()) == 2  # only the killed run ran again
    assert len(calls) == 2 * (4 * 2 + 3)
    for study in search.studies(spec):
        trials = search.open_study(study, spec["search"]).get_trials()
        assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def _worker(spec_path: str, log: str) -> None:
    spec = search.read_sweep(spec_path)
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(Path(log), pause=0.05))


def test_two_workers_drain_one_search_each_cell_once(tmp_path):
    spec = spec_at(tmp_path)
    log = tmp_path / "calls"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_worker, args=(str(tmp_path / "sweep.yaml"), str(log))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    calls = Counter(log.read_text().split())
    assert len(calls) == 2 * (4 * 2 + 3) and set(calls.values()) == {1}
    for study in search.studies(spec):
        assert len(search.open_study(study, spec["search"]).get_trials()) == 4
    assert len(records_of(Path(spec["output_dir"]), "final")) == 6


def test_tpe_sampler_keeps_the_budget_and_the_range(tmp_path):
    spec = spec_at(tmp_path, trials=3, sampler="tpe")
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(tmp_path / "calls"))
    found = records_of(Path(spec["output_dir"]), "search")
    assert len(found) == 2 * 3 * 2
    for method, (low, high) in {"full": (1e-5, 1e-3), "lora": (1e-4, 3e-2)}.items():
        lrs = {r["config"]["train"]["lr"] for r in found if r["config"]["method"]["name"] == method}
        assert len(lrs) == 3 and all(low <= lr <= high for lr in lrs)


def test_a_restarted_tpe_search_draws_new_rates_not_trial_0s_again(tmp_path):
    """Each invocation (a restart, another worker) opens the study with a new sampler: seeded alike, it would draw
    trial 0's rate for trial 1 (the same run id, a trial spent on nothing)."""
    spec = spec_at(tmp_path, trials=4, sampler="tpe")
    study = search.studies(spec)[0]
    drawn = []
    for _ in range(3):  # three workers or restarts, one trial each
        optuna_study = search.open_study(study, spec["search"])
        board = sweep.board(spec)
        number, settings = search.next_trial(optuna_study, study, spec["search"], set(), board)
        optuna_study.tell(number, 0.5)
        drawn.append(settings["lr"])
    assert len(set(drawn)) == 3, drawn


def test_a_search_edited_after_it_started_is_refused_by_name(tmp_path):
    """A changed range, trial count or seed list would choose among the old trials and label the result with
    the new budget; more final seeds only add final runs."""
    spec = spec_at(tmp_path, trials=2)
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(tmp_path / "calls"))
    for old, new, field in [("lora: [1e-4, 3e-2]", "lora: [1e-3, 3e-1]", "lr_range [0.001, 0.3]"),
                            ("trials: 2", "trials: 3", "trials 3"), ("seeds: [1, 2]\n", "seeds: [1]\n", "seeds [1]")]:
        edited = spec_at(tmp_path, trials=2, **{old: new})
        with pytest.raises(PeftbenchError) as err:
            search.run_search(search.studies(edited), edited["search"], runner=fake_runner(tmp_path / "calls"))
        assert str(err.value).startswith(f"{tmp_path / 'sweep.yaml'}: field 'search' sets {field} for synthetic-")
    more = spec_at(tmp_path, trials=2, **{"seeds: [1, 2, 3]": "seeds: [1, 2, 3, 4]"})
    outcome, *_ = search.run_search(search.studies(more), more["search"], runner=fake_runner(tmp_path / "calls"))
    assert len(records_of(Path(more["output_dir"]), "final")) == 2 * 4


def test_a_diverged_trial_counts_in_the_budget_and_all_failed_leaves_the_study_open(tmp_path, capsys):
    spec = spec_at(tmp_path)
    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"],
                                                   runner=fake_runner(tmp_path / "calls", fail_above=2e-4))
    # full: 1e-5 and 4.64e-5 succeed, 2.15e-4 and 1e-3 fail; lora: only 1e-4 succeeds. Two seeds per trial.
    assert outcome.failed == 0 and outcome.failed_trials == 2 * (2 + 3)
    final = records_of(Path(spec["output_dir"]), "final")
    assert {(r["config"]["method"]["name"], r["config"]["train"]["lr"]) for r in final} == {("full", 4.64e-5),
                                                                                            ("lora", 1e-4)}
    assert waiting == no_final == []
    (tmp_path / "all").mkdir()
    spec = spec_at(tmp_path / "all", trials=2)
    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"],
                                                   runner=fake_runner(tmp_path / "calls2", fail_above=1e-9))
    assert waiting == [] and [s.split(" ")[0].rsplit("-", 1)[0] for s in no_final] == ["synthetic-full",
                                                                                         "synthetic-lora"]
    assert not (Path(spec["output_dir"]) / "final").exists()


@pytest.mark.parametrize("edit, message", [
    (("trials: 4", "trials: 0"), "'search.trials' must be an integer >= 1"),
    (("sampler: grid", "sampler: random"), "'search.sampler' must be one of grid, tpe"),
    (("lora: [1e-4, 3e-2]", "lora: [1e-4, 1.004e-4]"), "'search.lr.lora': [0.0001, 0.0001004] holds fewer than 4"),
    (("lora: [1e-4, 3e-2]", "lora: [3e-2, 1e-4]"), "'search.lr.lora' must be [low, high]"),
    (("lora: [1e-4, 3e-2]", "lorax: [1e-4, 3e-2]"), "lorax"),
    (("seeds: [1, 2]\n", "seeds: [1, 1]\n"), "'search.seeds' must be a list of distinct integers"),
    (("  sampler: grid\n", "  sampler: grid\n  budget: 3\n"), "unknown key 'search.budget'"),
    (("method.name: [full, lora]", "method.name: [full, lora]\n  train.lr: [1e-3]"), "'grid.train.lr' cannot be set"),
    (("final:\n  seeds: [1, 2, 3]", "final:\n  seeds: [1, 2, 3]\n  trials: 2"), "'final' must hold 'seeds' \\(and"),
])
def test_bad_search_sections_name_the_field(tmp_path, edit, message):
    with pytest.raises(PeftbenchError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        spec_at(tmp_path, **{edit[0]: edit[1]})
    assert str(tmp_path / "sweep.yaml") in str(err.value) or message == "lorax"


def test_search_command_end_to_end_and_its_leaderboard(tmp_path, capsys):
    """Real training on the tiny backbone: a 2-trial search for LoRA, then 2 final seeds; the table shows the
    tuned row, the chosen learning rate, the budget and the sensitivity figure, and no search run."""
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(trials=2, sampler="grid", out=tmp_path / "results")
                    .replace("[full, lora]", "[lora]").replace("seeds: [1, 2]\n", "seeds: [1]\n")
                    .replace("seeds: [1, 2, 3]", "seeds: [1, 2]"))
    args = ["sweep", str(path), "train.max_steps=6", "task.max_train_samples=64", "train.measure_inference=false"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 studies in this shard (2 learning rates each)" in out
    assert "trial 1/2, lr 0.0001" in out or "trial 1/2, lr 0.03" in out
    assert "chosen (trial" in out
    results = tmp_path / "results"
    assert len(records_of(results, "search")) == 2 and len(records_of(results, "final")) == 2
    assert (results / "search.db").is_file()
    assert main([*args, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "2/2 trials [" in dry and "chosen lr" in dry
    (results / "search.db").rename(tmp_path / "search.db")  # a clone: the records, without the search database
    assert main([*args, "--dry-run"]) == 0
    from_records = capsys.readouterr().out
    assert "(from its records)" in from_records and from_records.replace(" (from its records)", "") == dry
    files, skipped = leaderboard.write([results], tmp_path / "board")
    assert skipped == []
    text = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "lora (lr tuned)" in text and "lr=" not in text.split("Learning rate chosen")[0].split("| method")[1]
    assert "learning rate searched: 2 trials per method (grid, mean dev score of seed 1)" in text
    assert "seeds 1, 2." in text
    chosen = read_record(next((results / "final").glob(f"*/{RECORD_NAME}")))["config"]["train"]["lr"]
    edge = {1e-4: "↓", 3e-2: "↑"}[chosen]  # two trials: the range's two ends
    assert f"| lora (lr tuned) | {chosen:.3g}{edge} |" in text and "↑ / ↓: the top / bottom" in text
    assert [p.name for p in (tmp_path / "board").glob("*-lr-sensitivity.png")] == [
        f"{groups_slug(results)}-lr-sensitivity.png"]
    groups = leaderboard.build(leaderboard.collect([results])[0])
    assert len(groups) == 1 and [len(r.records) for r in groups[0].rows.values()] == [2]  # final runs only
    assert len(groups[0].search) == 2
    csv_rows = (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and ",lora,lr tuned,synthetic,test," in csv_rows[1]  # header + the tuned row


def groups_slug(results: Path) -> str:
    (group,) = leaderboard.build(leaderboard.collect([results])[0])
    return group.slug


def test_every_method_documents_its_default_learning_rate_and_range():
    from peftbench import config
    from peftbench.methods import get_method, method_names

    docs = Path(__file__).resolve().parents[1] / "docs" / "methods"
    needs = {"loftq": ["model.quantization=4bit"]}  # its start is the error of a 4-bit base
    for name in method_names():
        (low, high), default = get_method(name).lr_range, get_method(name).default_lr
        assert 0 < low <= default <= high, name
        page = (docs / f"{name}.md").read_text()
        assert f"default range {low:g} to {high:g}" in page and f"Default learning rate {default:g}:" in page
        assert config.load(None, [f"method.name={name}", *needs.get(name, [])]).train.lr == default  # unset: its own
        assert config.load(None, [f"method.name={name}", "train.lr=0.123", *needs.get(name, [])]).train.lr == 0.123


SPACE = """\
  space:
    lora: {method.r: [4, 8, 16], train.warmup_ratio: {low: 0.0, high: 0.2}}
"""


def test_a_search_space_beyond_the_rate_is_drawn_recorded_chosen_and_tabled(tmp_path):
    """LoRA searches its rank and warm-up beside the rate, full only the rate, each with 5 trials; the fake dev
    score peaks at rank 8. The final runs take the best trial's every setting, and the table shows them."""
    spec = spec_at(tmp_path, trials=5, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n" + SPACE})
    runner = fake_runner(tmp_path / "calls")

    def ranked(cfg, provenance=None):
        result = runner(cfg, provenance)
        if cfg.method.name == "lora":  # the rank matters too
            result.record["metrics"]["score"] -= 0.05 * abs(math.log2(cfg.method.r / 8))
            write_atomic(f"{cfg.output_dir}/{RECORD_NAME}", result.record)
        return result

    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"], runner=ranked)
    assert waiting == no_final == [] and outcome.failed == 0
    out = Path(spec["output_dir"])
    tried = [r for r in records_of(out, "search") if r["config"]["method"]["name"] == "lora"]
    assert len(tried) == 5 * 2 and {r["config"]["method"]["r"] for r in tried} <= {4, 8, 16}
    assert all(0.0 <= r["config"]["train"]["warmup_ratio"] <= 0.2 for r in tried)
    assert all(r["provenance"]["budget"]["space"] == {"method.r": {"choices": [4, 8, 16]}, "train.warmup_ratio": {
        "low": 0.0, "high": 0.2, "log": False, "int": False}} for r in tried)
    trials = {}
    for r in tried:
        key = (r["config"]["train"]["lr"], r["config"]["method"]["r"], r["config"]["train"]["warmup_ratio"])
        trials.setdefault(key, []).append(r["metrics"]["score"])
    best = max(trials, key=lambda k: (sum(trials[k]) / len(trials[k]), -k[0]))
    final = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "lora"]
    assert len(final) == 3 and all((r["config"]["train"]["lr"], r["config"]["method"]["r"],
                                    r["config"]["train"]["warmup_ratio"]) == best for r in final)
    assert final[0]["provenance"]["chosen_settings"] == {"method.r": best[1], "train.warmup_ratio": best[2]}
    full = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "full"]
    assert "space" not in full[0]["provenance"]["budget"] and "chosen_settings" not in full[0]["provenance"]
    (group,) = leaderboard.build(leaderboard.collect([out])[0])
    full_row, lora_row = sorted(group.rows.values(), key=lambda row: row.method)  # one row each: r splits none
    assert full_row.label == "full (lr tuned)" and len(lora_row.records) == 3
    assert lora_row.label.endswith("lr, r, warmup_ratio tuned)") and " r=" not in lora_row.label
    assert "learning rate and r, warmup_ratio searched: 5 trials per method (tpe" in group.budget
    title, header, rows = lr_table(group)
    assert title.startswith("Settings chosen on dev by the search") and header == ["method", "synthetic"]
    assert rows[1] == [lora_row.label, f"{best[0]:.3g}; r={best[1]}; warmup_ratio={best[2]:.3g}"]
    dropped = spec_at(tmp_path, trials=5, sampler="tpe")  # the same search without its space: refused
    with pytest.raises(PeftbenchError, match="field 'search' sets space None for synthetic-lora-"):
        search.run_search(search.studies(dropped), dropped["search"], runner=ranked)


def test_a_peft_tuners_own_option_is_searched_through_its_options(tmp_path, monkeypatch):
    """``method.options.r`` of the bridge's VeRA (docs/sweeps.md's example): each trial's runs hold the drawn
    rank in their config's options, the final runs the chosen one, and the table names it."""
    monkeypatch.setitem(BEST, "vera", 1e-2)
    space = "  space:\n    vera: {method.options.r: [64, 256]}\n"
    spec = spec_at(tmp_path, trials=3, sampler="tpe", **{"method.name: [full, lora]": "method.name: [full, vera]",
                                                         "  sampler: tpe\n": "  sampler: tpe\n" + space})
    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"],
                                                   runner=fake_runner(tmp_path / "calls"))
    assert waiting == no_final == [] and outcome.failed == 0
    out = Path(spec["output_dir"])
    tried = [r for r in records_of(out, "search") if r["config"]["method"]["name"] == "vera"]
    assert tried and {r["config"]["method"]["options"]["r"] for r in tried} <= {64, 256}
    final = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "vera"]
    chosen = final[0]["provenance"]["chosen_settings"]
    assert set(chosen) == {"method.options.r"} and all(r["config"]["method"]["options"]["r"] == chosen[
        "method.options.r"] for r in final)
    (group,) = leaderboard.build(leaderboard.collect([out])[0])
    _, _, rows = lr_table(group)
    assert any(f"options.r={chosen['method.options.r']}" in row[1] for row in rows), rows


@pytest.mark.parametrize("space, message", [
    ("  space:\n    lora: {method.r: [4, 8]}\n", "field 'search.space' needs sampler: tpe"),
    ("  space:\n    lora: {train.lr: [1e-3]}\n", "'search.space.lora.train.lr': not a searchable key"),
    ("  space:\n    lora: {method.rank: [4]}\n", "'search.space.lora.method.rank': not a searchable key"),
    ("  space:\n    lora: {method.r: {low: 8, high: 4}}\n", "'search.space.lora.method.r' must be a list of values"),
    ("  space:\n    lora: {method.dropout: {low: 0, high: 0.3, log: true}}\n", "log: true needs low > 0"),
    ("  space:\n    lora: {method.r: [0, 8]}\n", "'search.space.lora.method.r': 0 does not make a valid run"),
    ("  space:\n    lora: {train.epochs: [1, 2]}\n", "'search.space.lora.train.epochs': not a searchable key"),
])
def test_bad_search_spaces_name_the_field(tmp_path, space, message):
    sampler = "grid" if "needs sampler" in message else "tpe"
    with pytest.raises(PeftbenchError, match=re.escape(message)):
        spec_at(tmp_path, sampler=sampler, **{f"  sampler: {sampler}\n": f"  sampler: {sampler}\n" + space})


def test_a_searched_key_the_sweep_sets_is_refused(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n" + SPACE,
                                               "  method.name: [full, lora]": "  method: [{name: lora, r: 4}]"})
    with pytest.raises(PeftbenchError, match=r"field 'search.space.lora.method.r': the sweep sets it too \(4 in "):
        search.studies(spec)


def test_a_float_key_searched_between_integers_draws_floats(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n  space:\n    lora: "
                                                                    "{method.dropout: {low: 0, high: 0}}\n"})
    assert spec["search"].space["lora"]["method.dropout"] == {"low": 0.0, "high": 0.0, "log": False, "int": False}


def test_an_optional_integer_key_searched_over_a_range_draws_integers(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"method.name: [full, lora]": "method.name: [full, adapter]",
                                               "  sampler: tpe\n": "  sampler: tpe\n  space:\n    adapter: "
                                                                    "{method.bottleneck: {low: 16, high: 128}}\n"})
    assert spec["search"].space["adapter"]["method.bottleneck"] == {"low": 16, "high": 128, "log": False, "int": True}


def test_a_record_from_before_a_key_existed_shares_the_row_of_one_at_its_default(tmp_path):
    """LoRA records written before method.b_lr_ratio and method.train_a existed pool with new ones at their
    defaults (LATER_KEYS), as their run ids do."""
    from peftbench import config

    for seed, old in ((1, True), (2, False)):
        cfg = config.load(None, ["method.name=lora", f"train.seed={seed}", f"output_dir={tmp_path / str(seed)}"])
        body = cfg.to_dict()
        if old:
            del body["method"]["b_lr_ratio"], body["method"]["train_a"]
        fake_runner(tmp_path / "calls")(config.resolve(body), {})
        if old:  # the record as an older peftbench wrote it
            record = read_record(tmp_path / str(seed) / RECORD_NAME)
            del record["config"]["method"]["b_lr_ratio"], record["config"]["method"]["train_a"]
            write_atomic(tmp_path / str(seed) / RECORD_NAME, record)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert [len(row.records) for row in group.rows.values()] == [2]


def test_final_variants_run_at_the_chosen_rate_and_are_compared_with_the_plain_row(tmp_path):
    """A study's training tricks run at the rate its search chose for the plain run: one row per trick, each
    with its difference to the plain tuned row."""
    variants = "final:\n  seeds: [1, 2, 3]\n  variants:\n    smooth: {train.label_smoothing: 0.1}\n" \
               "    ema: {train.ema_decay: 0.99, train.scheduler: cosine, methods: [lora]}"
    spec = spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]": variants})
    assert spec["search"].final_variants == {"smooth": {"train.label_smoothing": 0.1}, "ema": {
        "train.ema_decay": 0.99, "train.scheduler": "cosine", "methods": ["lora"]}}
    out = Path(spec["output_dir"])
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(tmp_path / "calls"))
    final = records_of(out, "final")
    assert len(final) == (2 + 3) * 3  # (full: plain + smooth; lora: plain + smooth + ema) x seeds
    for method in ("full", "lora"):
        mine = [r for r in final if r["config"]["method"]["name"] == method]
        assert len({r["config"]["train"]["lr"] for r in mine}) == 1  # every variant at the chosen rate
        assert Counter(r["provenance"]["variant"] for r in mine) == {None: 3, "smooth": 3, **(
            {"ema": 3} if method == "lora" else {})}
        assert all(r["config"]["train"]["label_smoothing"] == 0.1 for r in mine if r["provenance"].get("variant")
                   == "smooth")
    (group,) = leaderboard.build(leaderboard.collect([out / "final"])[0])
    assert len(group.rows) == 5
    plain = {row.method: row.label for row in group.rows.values() if not row.tricks}
    assert {label: ref.label for label, ref in group.references.items()} == {
        row.label: plain[row.method] for row in group.rows.values() if row.tricks}
    with pytest.raises(PeftbenchError, match="final.variants.bad.train.lr'.*other than the rate"):
        spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]": "final:\n  seeds: [1]\n  variants: {bad: {train.lr: 1}}"})
    with pytest.raises(PeftbenchError, match="final.variants.bad.train.adversarial'.*does not make a valid run"):
        spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]":
                             "final:\n  seeds: [1]\n  variants: {bad: {train.adversarial: fgsm}}"})


def _trials(line: str) -> tuple[str, set[str], str]:
    """(count, each tried setting with its score, the chosen one) of a ``--dry-run`` line."""
    count = re.search(r": (\d+/\d+) trials", line).group(1)
    tried = set(filter(None, re.search(r"\[(.*)\]", line).group(1).split("; ")))
    chosen = re.search(r"; chosen ([^(]*?)(?: \(from its records\))?$", line)
    return count, tried, chosen.group(1) if chosen else ""


def test_a_variant_is_weighed_against_the_studys_own_settings_not_the_defaults(tmp_path):
    """A recipe on a cosine schedule may try the default linear one as a variant; a variant that repeats the
    study's own setting would be its plain run under another name, and is refused."""
    from peftbench.search.run import _variants

    cosine = {"train: {epochs: 1}": "train: {epochs: 1, scheduler: cosine}"}
    for name, scheduler in (("linear", "linear"), ("same", "cosine")):
        variants = f"final:\n  seeds: [1]\n  variants: {{{name}: {{train.scheduler: {scheduler}}}}}"
        spec = spec_at(tmp_path, **cosine, **{"final:\n  seeds: [1, 2, 3]": variants})
        study = search.studies(spec)[0]
        if name == "linear":
            assert _variants(study, spec["search"]) == [(None, {}), ("linear", {"train.scheduler": "linear"})]
        else:  # refused before the first trial, not after a whole search
            calls = tmp_path / "calls"
            with pytest.raises(PeftbenchError, match="'final.variants.same': .* already runs with "
                                                     "train.scheduler=cosine, so it would be its plain run"):
                search.run_search(search.studies(spec), spec["search"], runner=fake_runner(calls))
            assert not calls.exists()


def test_a_dry_run_starts_no_study(tmp_path):
    """Looking creates nothing: a study first seen by a dry run would keep that budget, and the real run, after
    an edit of the search, would be refused."""
    from peftbench.search.trials import stored_studies

    spec = spec_at(tmp_path)
    full, lora = search.studies(spec)
    search.run_search([full], spec["search"], runner=fake_runner(tmp_path / "calls"))
    lines = search.describe([full, lora], spec["search"])
    assert lines[0].startswith(f"{full.label}: 4/4 trials") and lines[1].startswith(f"{lora.label}: 0/4 trials")
    assert stored_studies(spec["search"]) == {full.name}
    edited = spec_at(tmp_path, trials=3)  # the search edited before lora's study started: allowed
    search.run_search([search.studies(edited)[1]], edited["search"], runner=fake_runner(tmp_path / "calls"))


def test_dry_run_without_the_database_reads_each_trial_back_from_its_records(tmp_path):
    """A clone holds the records but not search.db: the same trials, scores (two seeds each, a diverged rate
    shown as FAIL) and choice. A trial is its settings, not a number of one database; a run cut short from
    outside and a record of another budget do not count."""
    spec = spec_at(tmp_path)
    studies = search.studies(spec)
    search.run_search(studies, spec["search"], runner=fake_runner(tmp_path / "calls", fail_above=1e-2))
    with_db = search.describe(studies, spec["search"])
    out = Path(spec["output_dir"])
    (out / "search.db").unlink()
    assert [line.replace(" (from its records)", "") for line in search.describe(studies, spec["search"])] == with_db
    lora = _trials(with_db[1])
    assert lora[0] == "4/4" and "lr 0.03 FAIL" in lora[1] and lora[2] == "lr 0.00448"

    runs = {p: read_record(p) for p in (out / "search").glob(f"*/{RECORD_NAME}")}
    mine = {p: r for p, r in runs.items() if r["config"]["method"]["name"] == "lora"}
    renumbered = next(p for p, r in mine.items() if r["config"]["train"]["seed"] == 1)
    trial = mine[renumbered]["provenance"]["trial"]
    write_atomic(renumbered, {**mine[renumbered], "provenance": {**mine[renumbered]["provenance"],
                                                                 "trial": (trial + 1) % 4}})  # another database's
    assert _trials(search.describe(studies, spec["search"])[1]) == lora
    chosen = [p for p, r in mine.items() if r["config"]["train"]["lr"] == 4.48e-3]
    write_atomic(chosen[0], {**mine[chosen[0]], "interrupted": True})  # cut short: still to do
    count, tried, pick = _trials(search.describe(studies, spec["search"])[1])
    assert (count, pick) == ("3/4", "") and not any(t.startswith("lr 0.00448") for t in tried)
    write_atomic(chosen[0], {**mine[chosen[0]], "provenance": {**mine[chosen[0]]["provenance"],
                                                               "budget": {"trials": 5}}})  # another search's
    assert _trials(search.describe(studies, spec["search"])[1])[0] == "3/4"
    assert _trials(search.describe(studies, spec["search"])[0]) == _trials(with_db[0])  # full: untouched


def test_a_dry_run_counts_the_final_runs_to_reuse_at_the_choice_once_it_is_made(tmp_path):
    """The first sweep's folder holds LoRA's final runs at its chosen rate and, as if another search had chosen
    it, at another grid rate. Before the second sweep searches, its dry run counts a final run at any grid rate
    (6); once it has chosen, only those at its choice (3), with the database or from the records alone."""
    quiet = {"train: {epochs: 1}": "train: {epochs: 1, measure_inference: false}"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = spec_at(tmp_path / "a", **quiet)
    search.run_search(search.studies(first), first["search"], runner=fake_runner(tmp_path / "a-calls"))
    lora = search.studies(first)[1]
    chosen = {r["config"]["train"]["lr"] for r in records_of(tmp_path / "a" / "results", "final")
              if r["config"]["method"]["name"] == "lora"}
    other = next(lr for lr in search.grid_lrs(*first["search"].lr_range("lora"), 4) if lr not in chosen)
    for seed in first["search"].final_seeds:
        fake_runner(tmp_path / "a-calls")(lora.cell_cfg("final", {"lr": other}, seed), {
            "phase": "final", "study": lora.name, "budget": first["search"].budget("lora")})
    second = spec_at(tmp_path / "b", **quiet, **{"output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    reuse = sweep.reusable(second["reuse"])

    def counted():
        return search.describe(search.studies(second), second["search"], reuse=reuse)[1].partition("; to reuse: ")[2]

    assert counted() == "8 search, 6 final runs"
    search.run_search(search.studies(second), second["search"], runner=fake_runner(tmp_path / "b-calls"),
                      reuse=reuse)
    b = Path(second["output_dir"])
    for record in records_of(b, "final"):  # the finals are still to do; the choice is made
        if record["config"]["method"]["name"] == "lora":
            shutil.rmtree(b / "final" / record["run_id"])
    assert counted() == "0 search, 3 final runs"
    (b / "search.db").unlink()
    assert counted() == "0 search, 3 final runs"


def test_a_search_takes_the_identical_runs_of_another_from_reuse(tmp_path, monkeypatch):
    """A second sweep with one method more and ``reuse`` pointing at the first: the shared studies' search and
    final runs are copied in (the same run ids), only the new method's run, and the choices agree."""
    monkeypatch.setitem(BEST, "bitfit", 1e-2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = {"train: {epochs: 1}": "train: {epochs: 1, measure_inference: false}"}  # fake runs measure none
    first = spec_at(tmp_path / "a", **quiet)
    search.run_search(search.studies(first), first["search"], runner=fake_runner(tmp_path / "a-calls"))
    second = spec_at(tmp_path / "b", **quiet, **{"method.name: [full, lora]": "method.name: [full, lora, bitfit]",
                                                 "output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    studies, reuse = search.studies(second), sweep.reusable(second["reuse"])
    planned = search.describe(studies, second["search"], reuse=reuse)
    assert [line.partition("; to reuse: ")[2] for line in planned] == \
        ["", "8 search, 3 final runs", "8 search, 3 final runs"]  # bitfit, full, lora: what the run copies below
    failed = studies[1].cell_cfg("search", {"lr": search.grid_lrs(*second["search"].lr_range("full"), 4)[0]}, 1)
    write_atomic(f"{failed.output_dir}/{RECORD_NAME}", make_record("failed", failed.to_dict(), failed.run_id, {},
                                                                   error="DivergedError: nan"))
    assert search.describe(studies, second["search"], reuse=reuse)[1].endswith("7 search, 3 final runs")
    assert search.describe(studies, second["search"], reuse=reuse, retry_failed=True)[1].endswith(
        "8 search, 3 final runs")  # what --retry-failed would copy over it
    shutil.rmtree(failed.output_dir)
    outcome, waiting, no_final = search.run_search(search.studies(second), second["search"],
                                                   runner=fake_runner(tmp_path / "b-calls"),
                                                   reuse=sweep.reusable(second["reuse"]))
    assert waiting == no_final == [] and (outcome.reused, outcome.ran) == (2 * (4 * 2 + 3), 4 * 2 + 3)
    assert not any("to reuse" in line for line in search.describe(search.studies(second), second["search"],
                                                                   reuse=sweep.reusable(second["reuse"])))  # copied
    ran = set((tmp_path / "b-calls").read_text().split())
    b = Path(second["output_dir"])
    assert {r["run_id"] for r in records_of(b, "search") + records_of(b, "final")
            if r["config"]["method"]["name"] == "bitfit"} == ran
    for phase in ("search", "final"):
        shared = {r["run_id"]: r for r in records_of(tmp_path / "a" / "results", phase)}
        copied = {r["run_id"]: r for r in records_of(b, phase) if r["run_id"] in shared}
        assert copied == shared and len(shared) == {"search": 16, "final": 6}[phase]
    (tmp_path / "c").mkdir()  # 3 trials: the range's ends are runs of the first sweep, made under another budget
    third = spec_at(tmp_path / "c", trials=3, **quiet,
                    **{"output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    assert not any("to reuse" in line for line in search.describe(search.studies(third), third["search"],
                                                                  reuse=sweep.reusable(third["reuse"])))
    outcome, _, _ = search.run_search(search.studies(third), third["search"], runner=fake_runner(tmp_path / "c-calls"),
                                      reuse=sweep.reusable(third["reuse"]))
    ends = {r["run_id"] for r in records_of(tmp_path / "a" / "results", "search")} & \
        {r["run_id"] for r in records_of(Path(third["output_dir"]), "search")}
    assert len(ends) == 2 * 2 * 2 and (outcome.reused, outcome.ran) == (0, 2 * (3 * 2 + 3))  # methods x ends x seeds
