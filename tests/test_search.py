import math
import multiprocessing
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
