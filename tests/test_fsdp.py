"""FSDP2 on CPU: two sharded gloo processes train as one process does (loss curve and saved weights within 1e-5),
each holds about half of the sharded bytes, and the checkpoint they write is the one-process format."""

import json
from pathlib import Path

import pytest
import torch
from conftest import same_steps, torchrun
from safetensors.torch import load_file

import peftbench
from peftbench import config, distributed, plan
from peftbench.records import read_record
from peftbench.train import run

METHODS = {"lora": ["method.dropout=0", "train.lr=5e-3"], "adapter": ["train.lr=5e-3"],
           "prefix": ["train.lr=1e-2"], "full": ["train.lr=5e-4"],
           "lora-4bit": ["method.dropout=0", "train.lr=5e-3", "model.quantization=4bit",  # FSDP-QLoRA
                         "model.quant_4bit_compute_dtype=fp32"]}
WEIGHTS = {"lora": "adapter_model.safetensors", "adapter": "trainable.safetensors",
           "prefix": "trainable.safetensors", "full": "model.safetensors", "lora-4bit": "adapter_model.safetensors"}


@pytest.mark.slow
@pytest.mark.parametrize("variant", METHODS)
def test_two_sharded_processes_train_as_one(variant, still_tiny, tmp_path):
    """The same global batch and data order: one process takes batches 2k and 2k+1 of the sampler as one step (two
    micro-batches), two processes take one each; FSDP2 averages their gradients as accumulation does. A 4-bit
    base (its codes packed in bf16 tensors under FSDP) shards like the float one."""
    method = variant.split("-")[0]
    one = run(config.load(None, same_steps(still_tiny, method, *METHODS[variant], "train.grad_accum_steps=2",
                                           f"output_dir={tmp_path / 'one'}"))).record
    proc = torchrun(2, "run", *same_steps(still_tiny, method, *METHODS[variant], "train.sharding=fsdp2",
                                          f"output_dir={tmp_path / 'two'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_record(tmp_path / "two" / "record.json")
    assert two["env"]["engine"] == "fsdp2" and two["env"]["num_processes"] == 2 and one["env"]["engine"] == "none"
    assert [p["step"] for p in two["loss_curve"]] == [p["step"] for p in one["loss_curve"]] == list(range(1, 11))
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (one["loss_curve"], two["loss_curve"])
    saved = {name: load_file(str(tmp_path / name / "checkpoint" / WEIGHTS[variant])) for name in ("one", "two")}
    assert saved["one"].keys() == saved["two"].keys()
    steps, lr = 10, one["config"]["train"]["lr"]
    for key in saved["one"]:
        # A key bias adds the same amount to every score of a query, which softmax ignores: its gradient is zero
        # but for rounding, which Adam scales up to steps of ~lr in a direction the summation order decides.
        noise_only = key.endswith("attention.self.key.bias")
        torch.testing.assert_close(saved["two"][key], saved["one"][key], atol=steps * lr if noise_only else 1e-5,
                                   rtol=0, msg=key)
    held, whole = two["params"]["held_bytes_per_process"], one["params"]["held_bytes_per_process"]
    for kind in ("weights", "gradients", "optimizer"):
        assert len(held[kind]) == 2 and all(abs(b - whole[kind][0] / 2) <= 0.1 * whole[kind][0] for b in held[kind])
    cfg = config.load(None, same_steps(still_tiny, method, *METHODS[variant], "train.sharding=fsdp2"))
    planned = plan.plan(cfg, [method], "cpu", processes=2, strategy="fsdp")["rows"][0]["memory"]
    for kind, value in {"weights": planned["base_weights"] + planned["trained_weights"],
                        "gradients": planned["gradients"], "optimizer": planned["optimizer_state"]}.items():
        assert abs(max(held[kind]) - value) <= 0.15 * value, (kind, held[kind], value)  # the planner knows sharding
    meta_one = json.loads((tmp_path / "one" / "checkpoint" / "peftbench.json").read_text(encoding="utf-8"))
    meta_two = json.loads((tmp_path / "two" / "checkpoint" / "peftbench.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "checkpoint").iterdir())  # the one-process format
    packed = ("fingerprint", "pretrained_fingerprint", "quant_storage")  # 4-bit codes packed in bf16, not uint8

    def base(meta):  # None for full fine-tuning: the checkpoint is the whole model
        return meta["base"] and {k: v for k, v in meta["base"].items() if "4bit" not in variant or k not in packed}
    assert base(meta_two) == base(meta_one)
    assert (meta_one["base"] is None) == (method == "full")
    model, tokenizer, _ = peftbench.load(tmp_path / "two" / "checkpoint")  # reloads in one process
    with torch.no_grad():
        assert model(**tokenizer(["股钱债涨跌"], return_tensors="pt")).logits.isfinite().all()


def test_the_launch_is_read_from_the_environment(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_taken", {})
    assert distributed.launch() == distributed.Launch("none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.launch().describe() == {"engine": "ddp", "num_processes": 4, "num_machines": 2}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as accelerate launch --config_file fsdp.yaml sets them
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "BertLayer")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    fsdp = distributed.launch()
    assert fsdp.engine == "fsdp2" and fsdp.layer_classes == ("BertLayer",) and not fsdp.reshard_after_forward
    import os

    assert "ACCELERATE_USE_FSDP" not in os.environ and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in os.environ  # taken over
    assert distributed.launch() == fsdp  # remembered for the next run of this process
    assert distributed.launch("ddp").engine == "ddp"


@pytest.mark.parametrize(("overrides", "cuda", "message"), [
    (["method.name=lora", "model.quantization=8bit"], False, "8bit cannot run under FSDP"),
    (["method.name=lora", "model.quantization=8bit"], True, "8bit cannot run under FSDP"),
])
def test_fsdp_refuses_what_it_cannot_shard(overrides, cuda, message):
    from peftbench.errors import PeftbenchError

    with pytest.raises(PeftbenchError, match=message):
        distributed.check(config.load(None, overrides), distributed.Launch("fsdp2", 2), cuda, False)


def test_every_method_is_allowed_under_fsdp():
    for name in ("full", "lora", "adalora", "adapter", "prefix", "prompt", "ia3", "bitfit"):
        distributed.check(config.load(None, [f"method.name={name}"]), distributed.Launch("fsdp2", 2), False,
                          name == "adalora")


def test_a_deepspeed_launch_on_cpu_is_refused_in_one_line():
    from peftbench.errors import PeftbenchError

    with pytest.raises(PeftbenchError, match="a DeepSpeed launch config needs GPUs"):
        distributed.check(config.load(None, ["method.name=lora"]), distributed.Launch("deepspeed", 2), False, False)


def test_held_bytes_count_shards():
    """Outside a launch every tensor is whole: the counts are the model's and the optimizer's own."""
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([model.weight])
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    held = distributed.held_bytes(model, optimizer)
    assert held == {"weights": 4 * 15, "gradients": 4 * 12, "optimizer": 4 * 24 + 4}  # exp_avg, exp_avg_sq, step


VARIANTS = {"lora": {}, "lora-dora": {"use_dora": True}, "lora-rslora": {"use_rslora": True}, "adalora": {},
            "adapter": {}, "adapter-pfeiffer": {"variant": "pfeiffer"}, "prefix": {}, "prompt": {}, "ia3": {},
            "bitfit": {}, "full": {}}


@pytest.mark.slow
def test_every_method_trains_sharded_and_its_checkpoint_serves_in_one_process(tmp_path):
    """One sharded sweep over every method; each checkpoint reloads with peftbench.load, a PEFT adapter also with
    plain PEFT (the same logits), and all of them serve from one process."""
    import yaml
    from fastapi.testclient import TestClient

    from peftbench.serve import create_app, load_adapters

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "recipe": {"task": {"name": "synthetic", "max_length": 32, "max_train_samples": 256},
                   "train": {"max_steps": 6, "sharding": "fsdp2", "gradient_checkpointing": True,
                             "measure_inference": False, "evaluate_test": False}},
        "grid": {"variants": [{"method": {"name": v.split("-")[0], **settings}} for v, settings in VARIANTS.items()]},
        "output_dir": str(tmp_path / "results")}), encoding="utf-8")
    proc = torchrun(2, "sweep", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [read_record(p) for p in (tmp_path / "results").glob("*/record.json")]
    assert len(records) == len(VARIANTS) and all(r["env"]["engine"] == "fsdp2" for r in records)
    texts = ["股钱债涨跌", "星影歌剧综艺"]
    ckpts = {}
    for record in records:
        name = "-".join([record["config"]["method"]["name"], *map(str, record["settings"]["method"].values())])
        ckpts[name] = record["checkpoint"]
        model, tokenizer, meta = peftbench.load(record["checkpoint"])
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.isfinite().all() and logits.shape == (2, 4), name
        if (Path(record["checkpoint"]) / "adapter_config.json").is_file():  # plain PEFT reads it alike
            from peft import AutoPeftModelForSequenceClassification

            plain = AutoPeftModelForSequenceClassification.from_pretrained(
                record["checkpoint"], id2label=dict(enumerate(meta["model_labels"])),
                pad_token_id=tokenizer.pad_token_id, dtype="float32").eval()
            with torch.no_grad():
                torch.testing.assert_close(plain(**batch).logits, logits, atol=1e-5, rtol=0, msg=name)
    with TestClient(create_app(load_adapters(ckpts), "t" * 32)) as client:
        for name in ckpts:
            answer = client.post("/v1/classify", json={"adapter": name, "texts": texts},
                                 headers={"Authorization": "Bearer " + "t" * 32})
            assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, (name, answer.text)
