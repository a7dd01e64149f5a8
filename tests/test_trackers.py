"""Experiment trackers through Accelerate, run for real and offline: TensorBoard event files read back with
tensorboard's reader, and a local MLflow store queried with MLflow's client."""

import pytest
from conftest import tensorboard_scalars

from peftbench import config
from peftbench.errors import PeftbenchError
from peftbench.train import run

ARGS = ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48", "method.name=lora", "train.lr=5e-3",
        "train.epochs=2", "task.max_train_samples=128", "train.measure_inference=false"]


def test_a_run_reports_to_tensorboard_and_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "results" / "run"
    cfg = config.load(None, [*ARGS, "train.report_to=[tensorboard,mlflow]", f"output_dir={out}"])
    record = run(cfg).record
    assert record["run_id"] == config.load(None, ARGS).run_id  # watching a run changes nothing it computes
    curve, history = record["loss_curve"], record["dev_history"]

    board = tensorboard_scalars(out / "trackers" / "peftbench")
    assert [step for step, _ in board["train/loss"]] == [point["step"] for point in curve]
    assert [v for _, v in board["train/loss"]] == pytest.approx([point["loss"] for point in curve], rel=1e-6)
    assert {"train/lr", "train/grad_norm"} <= set(board)
    assert [v for _, v in board["dev/accuracy"]] == pytest.approx([h["accuracy"] for h in history], rel=1e-6)
    assert board["final/test_accuracy"] == [(record["total_steps"], pytest.approx(record["metrics"]["test_accuracy"]))]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("peftbench").experiment_id])
    assert found.info.run_name == record["run_id"]
    assert found.data.params["train.lr"] == "0.005" and found.data.params["method.name"] == "lora"
    losses = sorted(client.get_metric_history(found.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.value for m in losses] == pytest.approx([point["loss"] for point in curve], rel=1e-6)
    assert found.data.metrics["final/test_accuracy"] == pytest.approx(record["metrics"]["test_accuracy"])


def test_an_unknown_tracker_is_refused():
    with pytest.raises(PeftbenchError, match=r"config key 'train.report_to' must be a list of tensorboard, mlflow"):
        config.load(None, [*ARGS, "train.report_to=[tensorbored]"])
