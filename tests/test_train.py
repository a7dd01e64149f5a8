import json
import random

import pytest
import torch

from peftbench import config
from peftbench.errors import PeftbenchError
from peftbench.metrics import classification_metrics
from peftbench.records import read_record
from peftbench.train import run

CHANCE = 0.25  # synthetic: 4 balanced topics
METHOD_SETTINGS = {"full": ["train.lr=5e-4"], "lora": ["train.lr=5e-3"]}


def quick(quick_overrides, method, *extra):
    return config.load(None, quick_overrides + [f"method.name={method}", "train.epochs=4", *METHOD_SETTINGS[method],
                                                *extra])


@pytest.fixture
def trained(trained_variants):
    """The session's full and LoRA runs (conftest); their reload to identical logits in a new process is
    asserted with every other method's in test_methods."""
    assert all(trained_variants[m].record["config"]["train"]["lr"] == float(METHOD_SETTINGS[m][0].split("=")[1])
               for m in METHOD_SETTINGS)
    return {m: trained_variants[m] for m in METHOD_SETTINGS}


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_trains_well_above_chance(trained, method):
    m = trained[method].record["metrics"]
    assert m["accuracy"] > CHANCE + 0.35, m
    assert m["test_accuracy"] > CHANCE + 0.35, m


@pytest.mark.parametrize("method", sorted(METHOD_SETTINGS))
def test_record_schema_and_counts(trained, method):
    result = trained[method]
    rec = read_record(f"{result.record['config']['output_dir']}/record.json")  # validates the schema
    assert rec == json.loads(json.dumps(result.record))
    assert rec["status"] == "success" and rec["schema_version"] == 2
    m, p, env = rec["metrics"], rec["params"], rec["env"]
    assert m["n_eval"] == 300 and m["test_n_eval"] == 300 and rec["data"]["n_train"] == 320  # max_train_samples
    assert m["train_samples_per_s"] > 0 and m["train_tokens_per_s"] > m["train_samples_per_s"]
    assert m["timed_steps"] == rec["total_steps"] - 5
    assert 0 < m["train_cpu_share"] <= 1.05  # the process's CPU time over the timed steps' wall time and threads
    assert m["peak_memory_mb"] > 0 and m["wall_s"] > 0 and m["eval_samples_per_s"] > 0
    assert 0 < p["trainable"] <= p["total"] and p["adapter_bytes"] > 0
    for key in ("python", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "device_name",
                "num_processes"):
        assert key in env
    model = result.model
    assert p["trainable"] == sum(q.numel() for q in model.parameters() if q.requires_grad)
    if method == "full":
        assert p["trainable"] == p["total"]
    else:
        assert p["trainable"] < 0.05 * p["total"]
    assert len(rec["dev_history"]) == rec["config"]["train"]["epochs"]  # one evaluation per epoch
    assert rec["metrics"]["score"] == max(h["score"] for h in rec["dev_history"])
    from peftbench.methods import get_method

    assert rec["learning_rate"] == {"peak": rec["config"]["train"]["lr"],
                                    "method_default": get_method(method).default_lr}


def test_classification_metrics_agree_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    cases = [([0, 1, 2, 2], [0, 2, 2, 3]), ([5, 5, 5], [5, 5, 5]), ([1, 1], [0, 0])]  # a class only predicted
    cases += [([rng.randrange(k) for _ in range(n)], [rng.randrange(k + 1) for _ in range(n)])
              for k, n in ((2, 10), (4, 300), (15, 57), (119, 1000))]
    for labels, preds in cases:
        m = classification_metrics(labels, preds)
        assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(labels, preds), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(sklearn.f1_score(labels, preds, average="macro", zero_division=0),
                                              abs=1e-12)
        assert m["n_eval"] == len(labels)
    with pytest.raises(ValueError, match="3 labels and 2 predictions"):
        classification_metrics([0, 1, 2], [0, 1])


def test_an_unset_learning_rate_trains_at_the_methods_rate(quick_overrides):
    rec = run(config.load(None, [*quick_overrides, "method.name=lora", "train.max_steps=2"])).record
    assert rec["config"]["train"]["lr"] == 5e-4 and rec["learning_rate"] == {"peak": 5e-4, "method_default": 5e-4}


def test_lora_checkpoint_holds_only_what_was_trained(trained):
    rec = trained["lora"].record
    assert rec["params"]["adapter_bytes"] < 0.1 * trained["full"].record["params"]["adapter_bytes"]


def test_grad_accumulation_matches_larger_batch_step_count(quick_overrides):
    a = run(quick(quick_overrides, "lora", "train.max_steps=4", "train.batch_size=16", "train.grad_accum_steps=2",
                  "train.save_checkpoint=false"))
    assert a.record["total_steps"] == 4 and a.record["metrics"]["timed_steps"] == 2


def test_crash_inside_a_run_writes_a_failed_record(quick_overrides, tmp_path, monkeypatch):
    from peftbench.methods.lora import Lora

    def boom(self, model, step):
        if step == 3:
            raise RuntimeError("boom at step 3")

    monkeypatch.setattr(Lora, "on_optimizer_step", boom)
    cfg = quick(quick_overrides, "lora")
    with pytest.raises(RuntimeError, match="boom"):
        run(cfg)
    rec = read_record(f"{cfg.output_dir}/record.json")
    assert rec["status"] == "failed" and rec["error"] == "RuntimeError: boom at step 3"
    assert rec["metrics"] == {} and rec["config"]["method"]["name"] == "lora"


def test_nan_loss_fails_the_run(quick_overrides):
    cfg = quick(quick_overrides, "full", "train.lr=1e30", "train.log_every=1", "train.max_grad_norm=0",
                "train.save_checkpoint=false")
    with pytest.raises(FloatingPointError, match="loss is nan"):
        run(cfg)
    assert read_record(f"{cfg.output_dir}/record.json")["status"] == "failed"


@pytest.mark.parametrize("scheduler, extra", [("linear", {}), ("cosine", {}), ("cosine_with_restarts", {"cycles": 3}),
                                              ("polynomial", {"power": 2.0}), ("constant", {}),
                                              ("inverse_sqrt", {})])
def test_every_schedule_follows_transformers(scheduler, extra):
    """The loop's factor, step by step, against transformers' get_scheduler on a real optimizer."""
    from transformers import get_scheduler

    from peftbench.loop import lr_factor

    cfg = config.LoopConfig(lr=1e-3, warmup_ratio=0.1, scheduler=scheduler, scheduler_cycles=extra.get("cycles", 1),
                            scheduler_power=extra.get("power", 1.0))
    planned = 60
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    name = {"constant": "constant_with_warmup"}.get(scheduler, scheduler)
    kwargs = {"cosine_with_restarts": {"num_cycles": cfg.scheduler_cycles},
              "polynomial": {"power": cfg.scheduler_power}}.get(scheduler, {})
    reference = get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_ratio * planned),
                              num_training_steps=planned, scheduler_specific_kwargs=kwargs)
    ours = []
    for step in range(planned):
        assert cfg.lr * lr_factor(step, planned, cfg) == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15)
        ours.append(lr_factor(step, planned, cfg))
        optimizer.step()
        reference.step()
    assert len(set(ours)) > (2 if scheduler == "constant" else 20)  # it moves (constant: warm-up, then flat)


def test_a_schedule_is_a_later_key_and_names_its_row(tmp_path):
    """Records that leave the schedule at linear keep their ids; a cosine run is its own row, labelled so."""
    from peftbench import leaderboard
    from peftbench.records import RECORD_NAME, make_record, write_atomic

    plain = config.load(None, ["method.name=lora", "train.lr=1e-3"])
    body = plain.to_dict()
    for key in ("scheduler", "scheduler_cycles", "scheduler_power"):
        del body["train"][key]
    assert config.resolve(body).run_id == plain.run_id
    with pytest.raises(PeftbenchError, match="config key 'train.scheduler' must be one of linear, cosine"):
        config.load(None, ["train.scheduler=warmup_stable_decay"])
    for name, overrides in (("plain", []), ("cosine", ["train.scheduler=cosine"])):
        cfg = config.load(None, ["method.name=lora", "train.lr=1e-3", *overrides])
        metrics = dict.fromkeys(["n_eval", "train_samples_per_s", "train_tokens_per_s", "eval_samples_per_s",
                                 "peak_memory_mb", "wall_s"], 1.0) | {"score": 0.5, "score_name": "accuracy"}
        record = make_record("success", cfg.to_dict(), cfg.run_id, {}, metrics,
                             {"trainable": 1, "total": 2, "adapter_bytes": 4}, extra={"provenance": {}})
        write_atomic(tmp_path / name / RECORD_NAME, record)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert sorted(row.label.split(", ")[-1] for row in group.rows.values()) == ["lr=0.001)", "scheduler=cosine)"]


def test_training_data_without_a_batch_fails_instead_of_looping_forever():
    from peftbench import loop

    cfg = config.LoopConfig(lr=1e-3)
    accelerator = loop.make_accelerator(cfg)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    def batches(epoch, skip):
        assert epoch < 3, "fit went on through empty epochs"  # fail here rather than hang
        return iter(())

    with pytest.raises(PeftbenchError, match="the training data yields no batch"):
        loop.fit(accelerator, model, optimizer, batches, cfg, loop.LoopState(planned_steps=3), loop.Hooks(),
                 list(model.parameters()))
