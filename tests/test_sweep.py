import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from peftbench import sweep
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.records import RECORD_NAME, make_record, read_record, write_atomic

GRID = """\
recipe: {{model: {{name_or_path: tiny}}, task: {{max_length: 48}}, train: {{epochs: 1}}}}
grid:
  task.name: [synthetic]
  variants:
    - {{method: {{name: full}}, train: {{lr: 5e-4}}}}
    - {{method: {{name: lora}}, train: {{lr: 5e-3}}}}
  train.seed: [1, 2, 3]
output_dir: {out}
"""


QUIET = ["train.measure_inference=false"]  # the fake runs below measure no serving cost


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(GRID.format(out=tmp_path / "results"))
    return sweep.read_sweep(path)


def fake_runner(calls, fail_on=(), interrupt_at=None, refuse=()):
    """Stands in for train.run: writes a record like it (success or failed); a cell it refuses writes none."""

    def runner(cfg, provenance=None):
        calls.append(cfg.run_id)
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        if (cfg.method.name, cfg.train.seed) in refuse:
            raise PeftbenchError("data.json:3: field 'label' missing")
        path = f"{cfg.output_dir}/{RECORD_NAME}"
        if (cfg.method.name, cfg.train.seed) in fail_on:
            write_atomic(path, make_record("failed", cfg.to_dict(), cfg.run_id, {}, error="RuntimeError: boom"))
            raise RuntimeError("boom")
        metrics = dict.fromkeys(["score", "n_eval", "train_samples_per_s", "train_tokens_per_s",
                                 "eval_samples_per_s", "peak_memory_mb", "wall_s"], 1.0) | {"score_name": "accuracy"}
        record = make_record("success", cfg.to_dict(), cfg.run_id, {}, metrics,
                             {"trainable": 1, "total": 2, "adapter_bytes": 4})
        write_atomic(path, record)
        return SimpleNamespace(record=record)

    return runner


def test_grid_expansion_and_stable_cell_ids(spec, tmp_path):
    cfgs = sweep.expand(spec)
    assert len(cfgs) == 6
    assert {(c.method.name, c.train.seed, c.train.lr) for c in cfgs} == {
        (m, s, lr) for m, lr in (("full", 5e-4), ("lora", 5e-3)) for s in (1, 2, 3)}
    assert len({c.run_id for c in cfgs}) == 6
    assert all(c.output_dir == str(tmp_path / "results" / c.run_id) for c in cfgs)
    assert [c.run_id for c in sweep.expand(spec)] == [c.run_id for c in cfgs]  # stable
    reordered = dict(spec, grid=dict(reversed(list(spec["grid"].items()))))
    assert {c.run_id for c in sweep.expand(reordered)} == {c.run_id for c in cfgs}  # independent of grid order
    assert {c.train.epochs for c in sweep.expand(spec, ["train.epochs=2"])} == {2}


def test_bad_sweep_files(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("grid: {train.seed: 3}\n")
    with pytest.raises(PeftbenchError, match=r"field 'grid\.train\.seed' must be a non-empty list"):
        sweep.read_sweep(path)
    path.write_text("grid: {train.seed: [1]}\nruns: 3\n")
    with pytest.raises(PeftbenchError, match="unknown sweep key 'runs'"):
        sweep.read_sweep(path)
    path.write_text("grid: {train.seedz: [1]}\n")
    with pytest.raises(PeftbenchError, match="unknown config key 'train.seedz'"):
        sweep.expand(sweep.read_sweep(path))
    path.write_text("grid: {train.seed: [1, 1]}\n")
    with pytest.raises(PeftbenchError, match="same config"):
        sweep.expand(sweep.read_sweep(path))
    path.write_text("grid: {train.seed: [1]}\nreuse: runs\n")
    with pytest.raises(PeftbenchError, match=r"field 'reuse' must list folders of records, got 'runs'"):
        sweep.read_sweep(path)
    with pytest.raises(PeftbenchError, match=f"field 'reuse': {tmp_path / 'none'} is not a folder"):
        sweep.reusable([str(tmp_path / "none")])


def test_a_bad_cell_value_names_the_sweep_or_recipe_file_and_its_line(tmp_path):
    """A value a grid cell or the recipe sets is named with its file and line; one an override sets, without."""
    path, recipe = tmp_path / "s.yaml", tmp_path / "r.yaml"
    cases = [("recipe:\n  task: {name: synthetic}\ngrid:\n  train.seed: [1]\n  train.epochs: [1, two]\n", [],
              f"{path}:5: config key 'train.epochs' must be int, got 'two'"),
             ("grid:\n  variants:\n    - {method: {name: lora}}\n    - {method: {name: lora, rr: 4}}\n", [],
              f"{path}:4: unknown config key 'method.rr'"),
             ("recipe:\n  train:\n    lr: abc\ngrid: {train.seed: [1]}\n", [],
              f"{path}:3: config key 'train.lr' must be float"),
             ("recipe: r.yaml\ngrid: {train.seed: [1]}\n", [], f"{recipe}:2: config key 'train.epochs' must be int"),
             ("recipe: r.yaml\ngrid: {train.seed: [1]}\n", ["train.epochs=x"], "config key 'train.epochs' must be int")]
    recipe.write_text("train:\n  epochs: 2.5\n")
    for text, overrides, message in cases:
        path.write_text(text)
        with pytest.raises(PeftbenchError, match=f"^{re.escape(message)}"):
            sweep.expand(sweep.read_sweep(path), overrides)


def test_a_bad_process_timeout_is_refused_before_the_processes_meet(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("recipe: {train: {dist_timeout: 5m}}\ngrid: {train.seed: [1]}\n")
    assert main(["sweep", str(path)]) == 2
    assert f"{path}: config key 'train.dist_timeout' must be >= 1 (seconds), got '5m'" in capsys.readouterr().err


def test_identical_cells_of_another_sweep_are_copied_in_not_run(spec, tmp_path, capsys):
    """``reuse``: a cell whose successful run (the same run id) lies under another sweep's folder is copied in
    whole and counted as reused; a failed, cut-short or different run there is run again."""
    calls = []
    sweep.run_sweep(sweep.plan(sweep.expand(spec, QUIET)), runner=fake_runner(calls))
    first = {c.run_id: c for c in sweep.expand(spec, QUIET)}
    failed, cut, other = sorted(first)[:3]
    path = Path(first[failed].output_dir) / RECORD_NAME
    write_atomic(path, make_record("failed", first[failed].to_dict(), failed, {}, error="RuntimeError: boom"))
    cut_record = read_record(Path(first[cut].output_dir) / RECORD_NAME)
    write_atomic(Path(first[cut].output_dir) / RECORD_NAME, {**cut_record, "interrupted": True})
    other_record = read_record(Path(first[other].output_dir) / RECORD_NAME)
    write_atomic(Path(first[other].output_dir) / RECORD_NAME, {**other_record, "run_id": "0" * 16})
    second = tmp_path / "second.yaml"
    bitfit = "    - {method: {name: lora}, train: {lr: 5e-3}}\n    - {method: {name: bitfit}}\n"
    second.write_text(GRID.format(out=tmp_path / "second").replace("    - {method: {name: lora}, train: {lr: 5e-3}}\n",
                                                                   bitfit) + f"reuse: [{tmp_path / 'results'}]\n")
    spec2 = sweep.read_sweep(second)
    assert main(["sweep", str(second), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert listed.count("to reuse") == 6 and listed.count("to do") == 3  # by run id; adopt checks each
    calls2 = []
    outcome = sweep.run_sweep(sweep.plan(sweep.expand(spec2, QUIET)), runner=fake_runner(calls2),
                              reuse=sweep.reusable(spec2["reuse"]))
    assert (outcome.cells, outcome.reused, outcome.ran) == (9, 3, 6) and outcome.summary().endswith(", reused 3")
    assert sorted(calls2) == sorted([failed, cut, other, *(c.run_id for c in sweep.expand(spec2, QUIET)
                                                           if c.method.name == "bitfit")])
    for run_id in set(first) - {failed, cut, other}:  # the very files, whole
        copied = tmp_path / "second" / run_id / RECORD_NAME
        assert copied.read_bytes() == (Path(first[run_id].output_dir) / RECORD_NAME).read_bytes()
    again = sweep.run_sweep(sweep.plan(sweep.expand(spec2, QUIET)), runner=fake_runner(calls2),
                            reuse=sweep.reusable(spec2["reuse"]))
    assert (again.reused, again.ran, again.done_before) == (0, 0, 9)


def test_shards_cover_every_cell_exactly_once(spec):
    cfgs = sweep.expand(spec)
    for n in (1, 2, 4, 7):
        ids = [c.run_id for i in range(n) for c in sweep.plan(cfgs, (i, n))]
        assert sorted(ids) == sorted(c.run_id for c in cfgs)
    with pytest.raises(PeftbenchError, match="i/N"):
        sweep.parse_shard("2")
    with pytest.raises(PeftbenchError, match="0 <= i < N"):
        sweep.parse_shard("4/4")


def test_killed_sweep_resumes_and_runs_every_cell_exactly_once(spec):
    cfgs = sweep.expand(spec)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(calls, interrupt_at=4))
    assert len(calls) == 4  # the 4th was killed before writing anything
    finished = calls[:3]
    sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(calls))
    counts = Counter(calls)
    assert len(counts) == 6
    assert all(counts[i] == 1 for i in finished) and counts[calls[3]] == 2  # only the killed cell ran again
    again = []
    records = sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(again)).records
    assert again == [] and len(records) == 6


def test_failed_cells_are_recorded_and_retried_on_request(spec, capsys):
    cfgs = sweep.expand(spec)
    calls = []
    records = sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(calls, fail_on={("lora", 2)})).records
    assert len(calls) == 6 and Counter(r["status"] for r in records) == {"success": 5, "failed": 1}
    assert "failed: RuntimeError: boom" in capsys.readouterr().err
    rerun = []
    sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(rerun))
    assert rerun == []
    sweep.run_sweep(sweep.plan(cfgs), retry_failed=True, runner=fake_runner(rerun))
    assert len(rerun) == 1
    assert all(c.status == "success" for c in sweep.plan(cfgs))


def test_a_cell_that_fails_without_a_record_counts_as_failed_and_runs_again(spec, capsys):
    """A run can fail before its record exists (the accelerator, its folder, a tracker) or while writing it (a
    full disk): the sweep counts it failed, so it exits non-zero, and a rerun tries the cell again."""
    def unrecorded(cfg, provenance=None):
        if (cfg.method.name, cfg.train.seed) == ("lora", 2):
            raise RuntimeError("tracker refused the login")
        return runner(cfg, provenance)

    cfgs, calls = sweep.expand(spec), []
    runner = fake_runner(calls)
    outcome = sweep.run_sweep(sweep.plan(cfgs), runner=unrecorded)
    assert len(calls) == 5 and len(outcome.records) == 5 and outcome.failed == 1
    assert "failed: RuntimeError: tracker refused the login" in capsys.readouterr().err
    rerun = []
    sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(rerun))
    assert len(rerun) == 1


def test_a_refused_cell_leaves_no_record_and_the_others_run(spec, capsys):
    cfgs = sweep.expand(spec)
    calls = []
    outcome = sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(calls, refuse={("full", 1)}))
    assert len(calls) == 6 and len(outcome.records) == 5 and outcome.refused == 1
    assert outcome.summary().endswith("failed 0, refused 1")
    assert "refused: data.json:3: field 'label' missing" in capsys.readouterr().err
    rerun = []
    sweep.run_sweep(sweep.plan(cfgs), runner=fake_runner(rerun))
    assert len(rerun) == 1  # the refused cell, and only it, runs again


def test_sweep_command_end_to_end(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(GRID.format(out=tmp_path / "results").replace("[1, 2, 3]", "[1]"))
    assert main(["sweep", str(path), "train.max_steps=4", "train.save_checkpoint=false"]) == 0
    out = capsys.readouterr().out
    assert "2 cells in this shard, 2 to run" in out
    cells = sorted(line.split(" (")[0] for line in out.splitlines() if line.startswith("cell "))
    assert [c.split(": ")[1] for c in cells] in (["synthetic full seed 1", "synthetic lora seed 1"],
                                                 ["synthetic lora seed 1", "synthetic full seed 1"])
    assert [c.split(":")[0] for c in cells] == ["cell 1/2", "cell 2/2"]
    for method in ("full", "lora"):  # the closing table: backbone and seed columns
        assert f"| synthetic | {method} | tiny (random init) | 1 |" in out
    records = sorted((tmp_path / "results").glob(f"*/{RECORD_NAME}"))
    assert len(records) == 2 and all(json.loads(p.read_text())["status"] == "success" for p in records)
    assert main(["sweep", str(path), "train.max_steps=4", "train.save_checkpoint=false", "--dry-run"]) == 0
    assert "2 cells in this shard, 0 to run" in capsys.readouterr().out


def test_shipped_sweeps_expand():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes" / "sweeps"
    clue = sweep.expand(sweep.read_sweep(root / "clue-peft.yaml"))
    assert len(clue) == 7 * 5 * 3
    assert {c.method.name for c in clue} == {"full", "adapter", "lora", "adalora", "prefix"}
    assert len(sweep.expand(sweep.read_sweep(root / "fewclue-peft.yaml"))) == 8 * 5 * 3


def test_a_cell_cut_short_from_outside_is_still_to_do(tmp_path):
    """A failed record marked ``interrupted`` (a lost process, a stop signal) is run again; another failed one
    is done (unless ``--retry-failed``)."""
    from peftbench import config

    cfg = config.load(None, ["task.name=synthetic", f"output_dir={tmp_path / 'cell'}"])
    (tmp_path / "cell").mkdir()
    for error, extra, status in (("LostProcess: process 0 of 2 lost another process", {"interrupted": True}, None),
                                 ("RuntimeError: a bug", None, "failed")):
        write_atomic(tmp_path / "cell" / RECORD_NAME, make_record("failed", cfg.to_dict(), cfg.run_id, {},
                                                                  error=error, extra=extra))
        assert sweep.record_status(cfg) == status


def test_a_reused_run_must_have_read_the_same_files_and_hold_what_the_cell_asks(tmp_path, capsys):
    """The run id names the backbone's and the data's paths, not what lies there: a run is taken only while the
    local backbone folder, the data folder's split files and the task's version are those its record read, and
    while it holds what the cell asks to be measured (its serving cost); each refusal says why."""
    import hashlib

    from peftbench import checkpoint, config

    backbone, data = tmp_path / "backbone", tmp_path / "data"
    backbone.mkdir()
    data.mkdir()
    (backbone / "config.json").write_text('{"model_type": "bert"}')
    for split in ("train", "dev"):
        (data / f"{split}.json").write_text('{"sentence": "体育", "label": "103"}\n')
    cell = sweep.Cell(config.load(None, ["task.name=tnews", f"task.data_dir={data}", f"model.name_or_path={backbone}",
                                         f"output_dir={tmp_path / 'here'}"]), None)
    metrics = dict.fromkeys(["score", "n_eval", "train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s",
                             "peak_memory_mb", "wall_s"], 1.0) | {"score_name": "accuracy"}
    source = tmp_path / "there" / cell.run_id

    def made(**changes):
        fingerprints = {split: {"file": f"{split}.json", "sha256": hashlib.sha256(
            (data / f"{split}.json").read_bytes()).hexdigest()} for split in ("train", "dev")}
        extra = {"backbone": {"random_init": False,
                              "fingerprint": checkpoint.backbone_fingerprint(str(backbone), None, False)},
                 "data": {"task_version": 1, "fingerprints": fingerprints}, "inference": {"split": "dev"}}
        write_atomic(source / RECORD_NAME, make_record("success", cell.cfg.to_dict(), cell.run_id, {}, metrics,
                                                       {"trainable": 1, "total": 2, "adapter_bytes": 4},
                                                       extra={**extra, **changes}))

    made()
    assert sweep.adopt([source], cell)["run_id"] == cell.run_id
    (data / "train.json").write_text('{"sentence": "财经", "label": "104"}\n')  # other data at the same path
    assert sweep.adopt([source], cell) is None
    made()
    (data / "test.json").write_text('{"sentence": "财经", "label": "104"}\n')  # a split it did not read
    assert sweep.adopt([source], cell) is None
    (data / "test.json").unlink()
    (backbone / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')  # another backbone there
    assert sweep.adopt([source], cell) is None
    made(data={"task_version": 0})  # the task's loader changed since
    assert sweep.adopt([source], cell) is None
    made(inference=None)  # the cell measures serving cost; the run did not
    assert sweep.adopt([source], cell) is None
    made(provenance={"phase": "search", "study": "tnews-lora-0"})  # a search's run stands for no plain cell
    assert sweep.adopt([source], cell) is None
    made(provenance={"budget": "3 trials"})  # a malformed budget is no budget, nor the plain cell's none
    assert sweep.adopt([source], cell) is None
    reasons = [line.split(": ", 2)[2] for line in capsys.readouterr().err.splitlines()]
    assert reasons == [f"the data files in {data} are not those it read"] * 2 + [
        f"another backbone is at {backbone} now", "task tnews is at another version now",
        "its serving cost was not measured (train.measure_inference)"] + [
        "made in another role (search phase, study, budget or variant)"] * 2


def test_reuse_finds_runs_through_links_takes_the_first_fit_one_and_a_copy_that_fails_runs_the_cell(spec, tmp_path):
    calls = []
    sweep.run_sweep(sweep.plan(sweep.expand(spec, QUIET)), runner=fake_runner(calls))
    cfgs = sorted(sweep.expand(spec, QUIET), key=lambda c: c.run_id)
    bad, good = tmp_path / "bad", tmp_path / "linked"
    (bad / cfgs[0].run_id).mkdir(parents=True)
    write_atomic(bad / cfgs[0].run_id / RECORD_NAME, {**read_record(Path(cfgs[0].output_dir) / RECORD_NAME),
                                                       "interrupted": True})
    good.symlink_to(tmp_path / "results")
    found = sweep.reusable([str(bad), str(good)])
    assert found[cfgs[0].run_id] == [bad / cfgs[0].run_id, good / cfgs[0].run_id] and len(found) == 6
    second = tmp_path / "second.yaml"
    second.write_text(GRID.format(out=tmp_path / "second"))
    spec2 = sweep.read_sweep(second)
    blocked = Path(sweep.expand(spec2, QUIET)[0].output_dir)  # a folder holding a stranger's file: the copy fails
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("mine")
    outcome = sweep.run_sweep(sweep.plan(sweep.expand(spec2, QUIET)), runner=fake_runner(calls2 := []), reuse=found)
    assert (outcome.reused, outcome.ran, outcome.failed) == (5, 1, 0) and calls2 == [blocked.name]
