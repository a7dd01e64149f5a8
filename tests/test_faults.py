"""Faults: a killed rerun, divergence, concurrent sweep workers, broken records, a full disk, crafted metadata."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_jsonl

from peftbench import checkpoint, config
from peftbench.cli import main
from peftbench.errors import DivergedError
from peftbench.records import RECORD_NAME, make_record, read_record, write_atomic
from peftbench.train import run

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
QUICK = ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=32", "method.name=lora", "train.lr=5e-3",
         "train.measure_inference=false"]


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_a_killed_rerun_leaves_the_old_record_and_checkpoint_together(tmp_path, how):
    out = tmp_path / "run"
    first = run(config.load(None, [*QUICK, "train.max_steps=2", "train.seed=1", f"output_dir={out}"])).record
    before = digest(out)
    proc = subprocess.Popen([sys.executable, "-m", "peftbench", "run", *QUICK, "train.epochs=200", "train.seed=2",
                             f"output_dir={out}"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's background
    # job ignores SIGINT, and so would the run it starts: Ctrl-C reaches a run in the foreground
    stage = checkpoint.staging_dir(out)
    deadline = time.time() + 120
    while not (stage / "checkpoint" / "base" / "model.safetensors").is_file():  # the new run has written weights
        assert proc.poll() is None and time.time() < deadline, "the rerun ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # well into training
    proc.send_signal(how)
    proc.wait(timeout=60)
    assert digest(out) == before  # the old pair, untouched
    assert read_record(out / RECORD_NAME)["config"]["train"]["seed"] == first["config"]["train"]["seed"] == 1
    second = run(config.load(None, [*QUICK, "train.max_steps=2", "train.seed=2", f"output_dir={out}"])).record
    assert read_record(out / RECORD_NAME)["run_id"] == second["run_id"] != first["run_id"]
    assert digest(out) != before and not stage.exists()


def test_an_output_dir_that_is_a_link_takes_run_after_run_in_the_folder_it_names(tmp_path):
    """The run is built beside and swapped in for the folder the link names (on that folder's disk); the link
    stays, and the next run's swap finds the way clear instead of failing after training."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "elsewhere").mkdir()
    out = tmp_path / "run"
    out.symlink_to(tmp_path / "disk" / "elsewhere")
    for seed in (1, 2, 3):
        stage = checkpoint.prepare_run_dir(out)
        assert stage.parent == tmp_path / "disk"
        write_atomic(stage / RECORD_NAME, {"seed": seed})
        checkpoint.publish(stage, out)
        assert out.is_symlink() and json.loads((out / RECORD_NAME).read_text())["seed"] == seed
        assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "run"]
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["elsewhere"]


def test_a_swap_cut_between_its_renames_is_finished_or_undone(tmp_path):
    out, old = tmp_path / "run", tmp_path / ".run.old"
    for folder, seed in ((old, 1), (checkpoint.staging_dir(out), 2)):
        folder.mkdir()
        write_atomic(folder / RECORD_NAME, {"seed": seed})
    checkpoint.prepare_run_dir(out)  # the new run was whole: the swap is finished
    assert json.loads((out / RECORD_NAME).read_text())["seed"] == 2 and not old.exists()
    shutil.rmtree(out)
    old.mkdir()
    write_atomic(old / RECORD_NAME, {"seed": 3})
    checkpoint.staging_dir(out).mkdir(exist_ok=True)  # the new run was not whole (no record): the old comes back
    checkpoint.prepare_run_dir(out)
    assert json.loads((out / RECORD_NAME).read_text())["seed"] == 3 and not old.exists()


def test_divergence_on_the_last_step_fails_the_run(tmp_path, capsys):
    """The loss of the only step is finite (it is computed before the update); the model after it is not."""
    args = [*QUICK, "method.name=bitfit", "train.lr=1e30", "train.max_steps=1", "train.max_grad_norm=0"]
    with pytest.raises(DivergedError, match=r"diverged: .+ not finite"):
        run(config.load(None, [*args, f"output_dir={tmp_path}/a"]))
    record = read_record(tmp_path / "a" / RECORD_NAME)
    assert record["status"] == "failed" and record["error"].startswith("diverged: ")
    assert not (tmp_path / "a" / "checkpoint").exists()
    assert main(["run", *args, f"output_dir={tmp_path}/b"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: run failed: {read_record(tmp_path / 'b' / RECORD_NAME)['error']} (failed record in {tmp_path}/b)"]


def test_a_failed_rerun_keeps_the_successful_run_it_would_replace(tmp_path, capsys):
    out = tmp_path / "run"
    run(config.load(None, [*QUICK, "method.name=bitfit", "train.max_steps=1", f"output_dir={out}"]))
    before = digest(out)
    diverging = [*QUICK, "method.name=bitfit", "train.lr=1e30", "train.max_steps=1", "train.max_grad_norm=0"]
    assert main(["run", *diverging, f"output_dir={out}"]) == 1
    assert digest(out) == before and not checkpoint.staging_dir(out).exists()
    assert f"(the earlier successful run in {out} is kept)" in capsys.readouterr().err


def test_a_sweep_stopped_from_outside_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM (a launcher or scheduler) inside a sweep's run: the run records it (tests/test_lost_process.py); the
    command ends with one error line and the signal's exit status, not a traceback."""
    import signal

    from peftbench import train
    from peftbench.errors import Stopped

    def stopped(cfg, provenance=None):
        raise Stopped("stopped by SIGTERM (a launcher stops every process when one of them fails; a scheduler "
                      "stops a job)")

    monkeypatch.setattr(train, "run", stopped)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"recipe: {{task: {{name: synthetic}}, method: {{name: lora}}}}\ngrid: {{train.seed: [1, 2]}}\n"
                    f"output_dir: {tmp_path / 'results'}\n")
    assert main(["sweep", str(spec)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: stopped by SIGTERM (a launcher stops every process when one of them fails; a scheduler stops a job); "
        "the cell's record is marked interrupted, and the sweep runs it again when resumed"]


def test_a_non_finite_trained_parameter_is_named():
    import torch

    from peftbench.loop import check_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite(list(model.parameters()), model, 3)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    with pytest.raises(DivergedError, match=r"diverged: trained parameter '1\.bias' is not finite after step 3"):
        check_finite(list(model.parameters()), model, 3)


@pytest.mark.slow
def test_two_sweep_workers_on_one_folder_run_every_cell_once(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("recipe: {model: {name_or_path: tiny}, task: {name: synthetic, max_length: 32}, "
                          "method: {name: lora}, train: {max_steps: 2, save_checkpoint: false, lr: 5e-3, "
                          "measure_inference: false}}\n"
                          f"grid: {{train.seed: [1, 2, 3, 4]}}\noutput_dir: {tmp_path / 'results'}\n")
    workers = [subprocess.Popen([sys.executable, "-m", "peftbench", "sweep", str(sweep_file)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    summaries = [out.strip().splitlines()[-1] for out, _ in outputs]
    ran = [int(s.split("ran ")[1].split(",")[0]) for s in summaries]
    assert all(s.startswith("sweep: 4 cells, ran ") for s in summaries), summaries
    assert sum(ran) == 4, summaries  # each cell ran exactly once, in one worker or the other
    records = [read_record(p) for p in (tmp_path / "results").glob(f"*/{RECORD_NAME}")]
    assert len(records) == 4 and all(r["status"] == "success" for r in records)
    assert not list((tmp_path / "results" / ".claims").iterdir())  # every claim released


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    from peftbench.claims import FolderBoard

    board, path = FolderBoard(tmp_path), tmp_path / ".claims" / "cell.json"
    live = board.claim("cell")
    assert live is not None and board.claim("cell") is None and path.is_file()
    live.release()
    assert not path.exists()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t"}), encoding="utf-8")
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # no heartbeat for an hour
    taken = board.claim("cell")
    assert taken is not None
    taken.release()


def test_a_claim_taken_over_is_not_released_by_its_old_holder_and_a_failed_beat_is_not_the_end(tmp_path,
                                                                                                 monkeypatch):
    from peftbench.claims import FolderBoard

    board, path = FolderBoard(tmp_path), tmp_path / ".claims" / "cell.json"
    old = board.claim("cell")
    token = json.loads(path.read_text())["token"]
    real_utime = os.utime

    def flaky(*args, **kwargs):  # a shared disk's passing error
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "utime", flaky)
    assert board._touch(path, token)  # beats on: the claim is still this worker's
    monkeypatch.setattr(os, "utime", real_utime)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "newer"}))  # taken over meanwhile
    assert not board._touch(path, token)
    old.release()
    assert json.loads(path.read_text())["token"] == "newer"  # the new holder keeps its claim


def good_record(root: Path, name: str, task: str = "tnews", score: float = 0.5) -> dict:
    cfg = config.load(None, ["task.name=tnews", "method.name=lora", "model.name_or_path=bert-base-chinese"])
    metrics = {"score": score, "score_name": "accuracy", "n_eval": 10, "train_samples_per_s": 1.0,
               "train_tokens_per_s": float("nan"), "eval_samples_per_s": 1.0, "peak_memory_mb": 1.0, "wall_s": 1.0}
    record = make_record("success", cfg.to_dict(), cfg.run_id, {"device_name": "cpu", "num_processes": 1}, metrics,
                         {"trainable": 1, "total": 2, "trainable_pct": 50.0, "adapter_bytes": 4},
                         extra={"settings": cfg.changed_settings()})
    record["config"]["task"]["name"] = task
    write_atomic(root / name / RECORD_NAME, record)
    return record


def test_leaderboard_skips_broken_records_and_escapes_text(tmp_path, capsys):
    root = tmp_path / "results"
    good_record(root, "good", "tnews", 0.61)
    good_record(root, "evil", "a|b<script>x$^$y", 0.5)  # bad mathtext breaks matplotlib
    (root / "number").mkdir()
    (root / "number" / RECORD_NAME).write_text("5\n", encoding="utf-8")
    (root / "bytes").mkdir()
    (root / "bytes" / RECORD_NAME).write_bytes(b'{"a": "\xff"}\n')
    no_task = good_record(root, "no-task")
    del no_task["config"]["task"]["name"]
    write_atomic(root / "no-task" / RECORD_NAME, no_task)
    for name, value in (("string-score", "high"), ("nan-score", float("nan"))):
        broken = good_record(root, name)
        broken["metrics"]["score"] = value
        (root / name / RECORD_NAME).write_text(json.dumps(broken), encoding="utf-8")  # NaN as Python writes it
    null_metrics = good_record(root, "null-metrics")
    write_atomic(root / "null-metrics" / RECORD_NAME, {**null_metrics, "metrics": None})
    write_atomic(root / "error-not-text" / RECORD_NAME, {**null_metrics, "status": "failed", "error": ["oom"]})
    assert main(["leaderboard", str(root), "--out", str(tmp_path / "lb")]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warned) == 7 and "Traceback" not in err
    for name in ("number", "bytes", "no-task", "string-score", "nan-score", "null-metrics", "error-not-text"):
        assert sum(f"/{name}/{RECORD_NAME}" in line for line in warned) == 1, name
    assert "field 'metrics' is NoneType, not an object" in err
    page = (tmp_path / "lb" / "leaderboard.md").read_text(encoding="utf-8")
    assert "2 records" in page and "7 unreadable records skipped" in page
    assert "<script>" not in page and "&lt;script&gt;" in page and "a\\|b" in page
    assert main(["leaderboard", str(root), "--out", str(tmp_path / "lb2"), "--strict"]) == 2
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]) == 1


def test_records_are_strict_json(tmp_path):
    path = write_atomic(tmp_path / RECORD_NAME, {"metrics": {"a": float("nan"), "b": [1.0, float("inf")], "c": 2.0}})
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in a record"))
    assert data["metrics"] == {"a": None, "b": [1.0, None], "c": 2.0}
    assert data["non_finite"] == {"metrics.a": "nan", "metrics.b[1]": "inf"}
    assert not math.isnan(data["metrics"]["c"])


def copied_checkpoint(trained_variants, tmp_path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained_variants["adapter"].record["checkpoint"], ckpt)
    return ckpt


def test_predict_refuses_a_crafted_task_name(trained_variants, tmp_path, capsys):
    ckpt = copied_checkpoint(trained_variants, tmp_path)
    meta = json.loads((ckpt / "peftbench.json").read_text(encoding="utf-8"))
    meta["task"] = "../../escaped"
    (ckpt / "peftbench.json").write_text(json.dumps(meta), encoding="utf-8")
    (tmp_path / "sub" / "out").mkdir(parents=True)
    assert main(["predict", str(ckpt), "--format", "clue", "--out", f"{tmp_path}/sub/out/"]) == 2
    assert "field 'task': '../../escaped' is not a registered task name" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*escaped*"))


def test_submission_needs_unique_ids(trained_variants, tmp_path, capsys):
    from peftbench.tasks.synthetic import generate_splits

    ckpt = copied_checkpoint(trained_variants, tmp_path)
    splits = generate_splits()
    splits["test"][5]["id"] = splits["test"][2]["id"]
    for split, name in (("train", "train_few_all.json"), ("dev", "dev_few_all.json"), ("test", "test_public.json")):
        write_jsonl(tmp_path / "data" / name, splits[split])
    assert main(["predict", str(ckpt), "--format", "clue", "--data-dir", str(tmp_path / "data"),
                 "--out", f"{tmp_path}/submit/"]) == 2
    assert (f"test_public.json:6: field 'id': id {splits['test'][2]['id']} repeats line 3"
            in capsys.readouterr().err)


def test_a_full_disk_gives_one_true_line_and_no_empty_files(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code = main(["run", *QUICK, "train.max_steps=2", f"output_dir={disk}/run"])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
        assert "No space left on device" in errors[0]
        record = disk / "run" / RECORD_NAME
        if record.is_file():
            assert "failed record in" in errors[0] and read_record(record)["status"] == "failed"
        else:
            assert "the failed record could not be written" in errors[0]
        assert not [p for p in disk.rglob("*") if p.is_file() and p.stat().st_size == 0]
    finally:
        subprocess.run(["umount", str(disk)], check=False)
