"""Ensembles: several checkpoints of one task predict with their probabilities averaged; ``peftbench ensemble``
writes a record listing its members, which the leaderboard shows as its own row."""

import json
import math

import pytest
import torch

from peftbench import config, ensemble, leaderboard
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.inference import SplitBatches, load
from peftbench.train import run

pytestmark = pytest.mark.slow  # end to end: trained members, predictions, records


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two LoRA runs of the synthetic task that differ in their seed."""
    root = tmp_path_factory.mktemp("members")
    return [run(config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48",
                                   "train.measure_inference=false", "method.name=lora", "train.lr=5e-3",
                                   "train.epochs=2", "task.max_train_samples=160", f"train.seed={seed}",
                                   f"output_dir={root / f'seed{seed}'}"])).record for seed in (1, 2)]


def mean_probabilities(ckpts, split):
    probs = []
    for ckpt in ckpts:
        model, tokenizer, meta = load(ckpt)
        with torch.no_grad():
            probs.append(torch.cat([model(**b["inputs"]).logits.softmax(-1)
                                    for b in SplitBatches(meta, tokenizer, split)]))
    return torch.stack(probs).mean(0)


def test_predict_averages_the_members_probabilities(members, tmp_path):
    ckpts = [m["checkpoint"] for m in members]
    assert main(["predict", *ckpts, "--split", "dev", "--out", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    mean = mean_probabilities(ckpts, "dev")
    assert len(rows) == len(mean)
    assert all(abs(r["score"] - float(p.max())) < 1e-5 for r, p in zip(rows, mean))
    labels = load(ckpts[0])[2]["labels"]
    assert [r["label"] for r in rows] == [labels[int(k)] for k in mean.argmax(-1)]
    single = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert main(["predict", ckpts[0], "--split", "dev", "--out", str(tmp_path / "one.jsonl")]) == 0
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert one != single  # the second member changes some scores


def test_an_ensemble_is_a_record_of_its_own_and_a_row_of_its_own(members, tmp_path, capsys):
    ckpts = [m["checkpoint"] for m in members]
    assert main(["ensemble", *ckpts, "--out", str(tmp_path / "ens")]) == 0
    assert "ensemble of 2: dev accuracy" in capsys.readouterr().out
    rec = json.loads((tmp_path / "ens" / "record.json").read_text())
    assert [m["run_id"] for m in rec["ensemble"]["members"]] == [m["run_id"] for m in members]
    for split, key in (("dev", "accuracy"), ("test", "test_accuracy")):
        mean = mean_probabilities(ckpts, split)
        gold = torch.tensor(SplitBatches(load(ckpts[0])[2], load(ckpts[0])[1], split).ds["label"])
        assert rec["metrics"][key] == pytest.approx(float((mean.argmax(-1) == gold).float().mean()))
    assert rec["per_example"]["test"]["n"] == rec["data"]["n_test"]
    assert rec["params"]["trainable"] == sum(m["params"]["trainable"] for m in members)
    assert rec["env"] == members[0]["env"] and rec["ensemble"]["scored_on"]["device"] == "cpu"  # the members' table
    rates = [m["metrics"]["train_samples_per_s"] for m in members]
    assert rec["metrics"]["train_samples_per_s"] == pytest.approx(1 / sum(1 / r for r in rates))
    assert rec["metrics"]["train_cpu_share"] == min(m["metrics"]["train_cpu_share"] for m in members)
    for m in members:  # the members' own records beside it
        (tmp_path / "runs" / m["run_id"]).mkdir(parents=True)
        (tmp_path / "runs" / m["run_id"] / "record.json").write_text(json.dumps(m))
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    labels = sorted(row.label for row in group.rows.values())
    member = next(label for label in labels if not label.startswith("ensemble"))
    assert labels == [f"ensemble (2 × {member})", member]
    ensemble_row = next(row for row in group.rows.values() if row.method == "ensemble")
    assert ensemble_row.cells[next(iter(group.tasks))].scores == [rec["metrics"]["test_score"]]


def test_an_ensembles_cpu_share_is_its_least_members_or_none():
    """The summed speed is vouched only as far as its least vouched part; a member without a share (an older
    record, a GPU run) or with a non-number leaves the ensemble without one."""
    def member(share):
        metrics = {"train_samples_per_s": 100.0, "train_tokens_per_s": 3000.0, "peak_memory_mb": 900.0}
        return {"metrics": metrics if share == "absent" else {**metrics, "train_cpu_share": share}}
    assert ensemble._costs([member(0.9), member(0.5)])["train_cpu_share"] == 0.5
    assert ensemble._costs([member(0.5), member(0.97)])["train_cpu_share"] == 0.5
    for other in ("absent", None, float("nan"), True, "0.9"):
        assert "train_cpu_share" not in ensemble._costs([member(0.9), member(other)]), other


def test_a_member_without_its_record_leaves_the_costs_unknown_not_zero():
    known = {"metrics": {"train_samples_per_s": 100.0, "train_tokens_per_s": 3000.0, "peak_memory_mb": 900.0},
             "params": {"trainable": 10, "total": 100, "adapter_bytes": 40}}
    assert ensemble._costs([known, known])["peak_memory_mb"] == 900.0
    assert ensemble._summed_params([known, known]) == {"trainable": 20, "total": 200, "adapter_bytes": 80}
    costs = ensemble._costs([known, None])  # a checkpoint copied without its run's record
    assert costs["peak_memory_mb"] is None and math.isnan(costs["train_samples_per_s"])
    assert ensemble._summed_params([known, None]) == dict.fromkeys(("trainable", "total", "adapter_bytes"))


def test_members_of_other_tasks_are_refused(members, tmp_path):
    ner = run(config.load(None, ["task.name=synthetic_ner", "model.name_or_path=tiny", "task.max_length=48",
                                 "train.measure_inference=false", "method.name=lora", "train.max_steps=2",
                                 f"output_dir={tmp_path / 'ner'}"])).record
    with pytest.raises(PeftbenchError, match="field 'task' is 'synthetic_ner', but .* has 'synthetic'"):
        from peftbench.inference import Ensemble

        Ensemble([members[0]["checkpoint"], ner["checkpoint"]])
