"""Prefix tuning with ``eager`` attention, first thing in a fresh process: it trains, saves, reloads, exports to
ONNX and serves, and on the same weights ``eager`` and ``sdpa`` give the same logits."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient

import peftbench
from peftbench.export import REPORT_FILE, export
from peftbench.methods.prefix import ATTENTION_NAME
from peftbench.models import without_peft
from peftbench.serve import create_app, load_adapters

pytestmark = pytest.mark.slow  # a fresh process, a run and an ONNX export

TEXTS = ["股钱债涨跌", "星影歌剧综艺星影", "球"]  # unequal lengths: padded rows


def with_attention(ckpt, attn, where):
    """A copy of checkpoint ``ckpt`` whose recorded config loads the base with attention ``attn``."""
    shutil.copytree(ckpt, where)
    meta = json.loads((where / "peftbench.json").read_text(encoding="utf-8"))
    meta["config"]["model"]["attn_implementation"] = attn
    (where / "peftbench.json").write_text(json.dumps(meta), encoding="utf-8")
    return where


def attention_of(model) -> set:
    """The attention the prefix attention wraps in each layer."""
    return {m.peftbench_prefix.base_attention.__name__ for m in without_peft(model).modules()
            if hasattr(m, "peftbench_prefix") and m.config._attn_implementation == ATTENTION_NAME}


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "eager"
    proc = subprocess.run([sys.executable, "-m", "peftbench", "run", "method.name=prefix", "task.name=synthetic",
                           "model.attn_implementation=eager", "task.max_length=48", "train.max_steps=40",
                           "train.lr=1e-2", "train.measure_inference=false", f"output_dir={out}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_eager_prefix_trains_in_a_fresh_process(eager_run):
    record = json.loads((eager_run / "record.json").read_text(encoding="utf-8"))
    assert record["status"] == "success" and record["config"]["model"]["attn_implementation"] == "eager"
    curve = [point["loss"] for point in record["loss_curve"]]
    assert curve[-1] < curve[0], curve


def test_eager_and_sdpa_reload_to_the_same_logits(eager_run, tmp_path):
    ckpt = eager_run / "checkpoint"
    eager, tokenizer, _ = peftbench.load(ckpt)
    sdpa, _, _ = peftbench.load(with_attention(ckpt, "sdpa", tmp_path / "sdpa"))
    assert attention_of(eager) == {"eager_attention_forward"} and attention_of(sdpa) == {"sdpa_attention_forward"}
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = eager(**batch).logits, sdpa(**batch).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    again, _, _ = peftbench.load(ckpt)  # a reload is exact
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, a)


def test_eager_prefix_exports_to_onnx(eager_run, tmp_path):
    out = export(eager_run / "checkpoint", tmp_path / "onnx", fmt="onnx")
    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    assert report["check"]["max_abs_logit_diff"] <= report["check"]["tolerance"]


def test_eager_and_sdpa_prefix_serve_the_same_answers(eager_run, tmp_path):
    ckpt = eager_run / "checkpoint"
    adapters = load_adapters({"eager": ckpt, "sdpa": with_attention(ckpt, "sdpa", tmp_path / "sdpa")})
    with TestClient(create_app(adapters, "t" * 32)) as client:
        answers = {name: client.post("/v1/classify", json={"adapter": name, "texts": TEXTS},
                                     headers={"Authorization": "Bearer " + "t" * 32}) for name in adapters}
    for response in answers.values():
        assert response.status_code == 200, response.text
    eager, sdpa = (answers[n].json()["predictions"] for n in ("eager", "sdpa"))
    assert [p["label"] for p in eager] == [p["label"] for p in sdpa]
    assert all(abs(p["score"] - q["score"]) <= 1e-5 for p, q in zip(eager, sdpa))
