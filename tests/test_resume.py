"""A fine-tuning run killed part-way resumes from its last training state (``train.resume=true``) and ends with
the weights and record of the run that was never killed; the state is refused where it cannot be exact."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

import peftbench.train.fine_tuning as fine_tuning
from peftbench import checkpoint, config
from peftbench.errors import PeftbenchError
from peftbench.train import run

SAVED = {"full": "model.safetensors", "prefix": "trainable.safetensors"}  # else a PEFT adapter
EVERY = 5  # train.save_state_every: states at 5, 10 (an epoch's end, its evaluation next), 15, 20, 25
KILLS = 3  # seeds the kill steps: LoRA resumes at an epoch's end, AdaLoRA mid-pruning, full before any evaluation


def cfg(method: str, out, *extra: str):
    """30 steps over 3 epochs of 10, a state every 5 steps."""
    return config.load(None, ["task.name=synthetic", f"method.name={method}", "task.max_length=32",
                              "task.max_train_samples=160", "train.batch_size=16", "train.epochs=3",
                              "train.log_every=1", f"train.save_state_every={EVERY}", "train.measure_inference=false",
                              f"output_dir={out}", *extra])


class Killed(BaseException):
    """A kill: nothing in the run catches it, and nothing after it runs."""


def kill_at(monkeypatch, step: int) -> None:
    """The next run dies inside optimizer step ``step`` (after the backward pass, before the step is counted)."""
    fit = fine_tuning.fit

    def fit_then_die(*args, **kwargs):
        hooks = args[6]
        on_step = hooks.on_optimizer_step

        def step_then_die(n: int) -> None:
            on_step(n)
            if n == step:
                raise Killed(f"killed in step {step}")

        hooks.on_optimizer_step = step_then_die
        return fit(*args, **kwargs)

    monkeypatch.setattr(fine_tuning, "fit", fit_then_die)


def timing_aside(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "eval_samples_per_s"} for entry in history]


@pytest.mark.parametrize("method, tricks", [
    ("lora", []), *(pytest.param("lora", [t], marks=pytest.mark.slow)  # averages are resumed too
                    for t in ("train.ema_decay=0.9", "train.swa_last=2")),
    *(pytest.param(m, [], marks=pytest.mark.slow) for m in ("adalora", "prefix", "full"))],
    ids=lambda v: v if isinstance(v, str) else "+".join(k.split("=")[0].removeprefix("train.") for k in v) or "plain")
def test_a_killed_run_resumes_to_the_uninterrupted_result(method, tricks, tmp_path, monkeypatch):
    whole = run(cfg(method, tmp_path / "whole", *tricks)).record
    step = random.Random(f"{method}{KILLS}").randint(EVERY + 1, 29)  # one per method, the same every session
    kill_at(monkeypatch, step)
    with pytest.raises(Killed):
        run(cfg(method, tmp_path / "cut", *tricks))
    monkeypatch.undo()
    saved_at = (step - 1) // EVERY * EVERY  # the last state written before the kill
    state_dir = checkpoint.training_state_dir(tmp_path / "cut")
    assert json.loads((state_dir / checkpoint.LOOP_STATE_FILE).read_text())["loop"]["step"] == saved_at
    assert not (tmp_path / "cut").exists()  # nothing published by the killed run

    resumed = run(cfg(method, tmp_path / "cut", "train.resume=true", *tricks)).record
    assert resumed["run_id"] == whole["run_id"] and resumed["resumed_from"] == [saved_at] and \
        "resumed_from" not in whole
    assert resumed["loss_curve"] == whole["loss_curve"], (step, saved_at)
    assert timing_aside(resumed["dev_history"]) == timing_aside(whole["dev_history"])
    for key in ("score", "best_epoch", "test_accuracy"):
        assert resumed["metrics"][key] == whole["metrics"][key], key
    name = SAVED.get(method, "adapter_model.safetensors")
    a, b = (load_file(str(tmp_path / run_dir / "checkpoint" / name)) for run_dir in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not state_dir.exists()  # a published run leaves no state to resume


def test_adalora_needs_its_importance_scores_to_resume_exactly(tmp_path, monkeypatch):
    """The budget allocator's scores live outside the weights: without them the resumed run ranks differently."""
    from peftbench.methods.adalora import AdaLora

    whole = run(cfg("adalora", tmp_path / "whole")).record
    kill_at(monkeypatch, 14)
    with pytest.raises(Killed):
        run(cfg("adalora", tmp_path / "cut"))
    monkeypatch.undo()
    monkeypatch.setattr(AdaLora, "load_training_state", lambda self, model, state: None)
    resumed = run(cfg("adalora", tmp_path / "cut", "train.resume=true")).record
    assert resumed["loss_curve"][:11] == whole["loss_curve"][:11]  # up to the state and one step after it
    assert resumed["loss_curve"] != whole["loss_curve"]


def test_resume_without_a_state_trains_from_the_start(tmp_path):
    record = run(cfg("bitfit", tmp_path / "run", "train.resume=true", "train.epochs=1")).record
    assert "resumed_from" not in record and record["loss_curve"][0]["step"] == 1


def test_a_state_of_another_configuration_is_refused(tmp_path, monkeypatch):
    kill_at(monkeypatch, 7)
    with pytest.raises(Killed):
        run(cfg("bitfit", tmp_path / "run"))
    monkeypatch.undo()
    with pytest.raises(PeftbenchError, match="different configuration"):
        run(cfg("bitfit", tmp_path / "run", "train.resume=true", "train.lr=3e-3"))


def test_an_unreadable_state_is_refused_in_one_line(tmp_path, monkeypatch):
    kill_at(monkeypatch, 7)
    with pytest.raises(Killed):
        run(cfg("bitfit", tmp_path / "run"))
    monkeypatch.undo()
    (checkpoint.training_state_dir(tmp_path / "run") / "process_0.pt").write_bytes(b"truncated")
    with pytest.raises(PeftbenchError, match=r"process_0\.pt: the training state cannot be read"):
        run(cfg("bitfit", tmp_path / "run", "train.resume=true"))
