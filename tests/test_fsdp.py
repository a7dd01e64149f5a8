"""FSDP2 on CPU, launched as users launch it (``accelerate launch --config_file recipes/accelerate/fsdp.yaml
--num_processes 2``): one sharded sweep over every method, each cell against the same run in one process. Two
sharded gloo processes train as one does (loss curve and saved weights within 1e-5), each holds about half of the
sharded bytes (what the planner says, ±15 %), and the checkpoint they write is the one-process format: it reloads
with ``peftbench.load`` and plain PEFT and serves."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BF16_CELL, FLOAT_CELLS, accelerate_launch, engine_recipe, is_cell, quantized_cells
from safetensors.torch import load_file

import peftbench
from peftbench import config, distributed, plan
from peftbench.methods import get_method
from peftbench.records import read_record

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
VARIANTS = {**FLOAT_CELLS, **BF16_CELL, **quantized_cells("4bit")}  # 4-bit: FSDP-QLoRA
# bf16: FSDP's MixedPrecisionPolicy casts the weights to bf16 for compute where one process runs autocast; the two
# round differently, so they agree to bf16's precision, not 1e-5
TOLERANCE = {"lora-bf16": 2e-2}
SAVED = {"full": "model.safetensors", "adapter": "trainable.safetensors", "prefix": "trainable.safetensors",
         "bitfit": "trainable.safetensors"}  # the rest save a PEFT adapter: adapter_model.safetensors


@pytest.fixture(scope="module")
def sharded(still_tiny, one_process, tmp_path_factory):
    """variant -> (the record of one process taking each step as two micro-batches, the record of the two sharded
    processes of the sweep taking one each)."""
    root = tmp_path_factory.mktemp("fsdp")
    sweep = root / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"recipe": config.parse_overrides(engine_recipe(still_tiny)),
                                     "output_dir": str(root / "two"), "grid": {"variants": list(VARIANTS.values())}}),
                     encoding="utf-8")
    proc = accelerate_launch("--config_file", str(FSDP_CONFIG), "--num_processes", "2", "-m", "peftbench", "sweep",
                             str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == \
        f"sweep: {len(VARIANTS)} cells, ran {len(VARIANTS)}, done before 0, claimed elsewhere 0, failed 0"
    records = [read_record(p) for p in (root / "two").glob("*/record.json")]
    pairs = {}
    for name, tree in VARIANTS.items():
        two = [r for r in records if is_cell(r, tree)]
        assert len(two) == 1, name
        pairs[name] = one_process(name, tree), two[0]
    return pairs


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_sharded_processes_train_as_one(variant, sharded):
    """The same global batch and data order: one process takes batches 2k and 2k+1 of the sampler as one step (two
    micro-batches), two processes take one each; FSDP2 averages their gradients as accumulation does. A 4-bit
    base (its codes packed in bf16 tensors under FSDP) shards like the float one."""
    one, two = sharded[variant]
    method = one["config"]["method"]["name"]
    assert (two["env"]["engine"], two["env"]["num_processes"], one["env"]["engine"]) == ("fsdp2", 2, "none")
    assert two["config"]["train"]["sharding"] == "auto"  # the launch config asked for it, not the recipe
    assert two["metrics"]["n_eval"] == one["metrics"]["n_eval"] == 300  # every dev example exactly once
    assert two["metrics"]["test_n_eval"] == one["metrics"]["test_n_eval"] == 300  # and every test example
    assert [p["step"] for p in two["loss_curve"]] == [p["step"] for p in one["loss_curve"]] == list(range(1, 11))
    tolerance = TOLERANCE.get(variant, 1e-5)
    for a, b in zip(one["loss_curve"], two["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= tolerance, (one["loss_curve"], two["loss_curve"])
    assert [h["step"] for h in two["dev_history"]] == [h["step"] for h in one["dev_history"]] == [5, 10]
    for a, b in zip(one["dev_history"], two["dev_history"]):
        assert abs(a["score"] - b["score"]) <= (1 if tolerance == 1e-5 else 5) / 300  # a prediction or few flip
    assert two["metrics"]["best_epoch"] == one["metrics"]["best_epoch"]
    ckpt = {"one": Path(one["checkpoint"]), "two": Path(two["checkpoint"])}
    weights = SAVED.get(method, "adapter_model.safetensors")
    saved = {name: load_file(str(folder / weights)) for name, folder in ckpt.items()}
    assert saved["one"].keys() == saved["two"].keys()
    steps, lr = 10, one["config"]["train"]["lr"]
    for key in saved["one"]:
        # A key bias adds the same amount to every score of a query, which softmax ignores: its gradient is zero
        # but for rounding, which Adam scales up to steps of ~lr in a direction the summation order decides.
        noise_only = key.endswith("attention.self.key.bias")
        torch.testing.assert_close(saved["two"][key], saved["one"][key], rtol=0, msg=key,
                                   atol=steps * lr if noise_only else tolerance)
    held, whole = two["params"]["held_bytes_per_process"], one["params"]["held_bytes_per_process"]
    whole_trained = get_method(method).reads_gradients  # AdaLoRA keeps its trained tensors whole, as planned
    for kind in ("weights", "gradients", "optimizer"):
        assert len(held[kind]) == 2
        if whole_trained and kind != "weights":
            assert held[kind] == whole[kind] * 2, kind
        else:  # the shards add up to one copy (a tensor of one row, as IA3's (1, n) scales, lies on one process)
            assert abs(sum(held[kind]) - whole[kind][0]) <= 0.1 * whole[kind][0], (kind, held[kind], whole[kind])
    assert all(abs(b - whole["weights"][0] / 2) <= 0.1 * whole["weights"][0] for b in held["weights"])  # about half
    cfg = config.resolve(two["config"])
    planned = plan.plan(cfg, [method], "cpu", processes=2, strategy="fsdp")["rows"][0]["memory"]
    for kind, value in {"weights": planned["base_weights"] + planned["trained_weights"],
                        "gradients": planned["gradients"], "optimizer": planned["optimizer_state"]}.items():
        assert abs(max(held[kind]) - value) <= 0.15 * value, (kind, held[kind], value)  # the planner knows sharding
    meta = {name: json.loads((folder / "peftbench.json").read_text(encoding="utf-8")) for name, folder in ckpt.items()}
    assert sorted(p.name for p in ckpt["two"].iterdir()) == sorted(p.name for p in ckpt["one"].iterdir())
    packed = ("fingerprint", "pretrained_fingerprint", "quant_storage")  # 4-bit codes packed in bf16, not uint8

    def base(meta):  # None for full fine-tuning: the checkpoint is the whole model
        return meta["base"] and {k: v for k, v in meta["base"].items() if "4bit" not in variant or k not in packed}
    assert base(meta["two"]) == base(meta["one"])
    assert (meta["one"]["base"] is None) == (method == "full")
    if variant.endswith("-4bit"):
        assert meta["two"]["base"]["quant_storage"] == "bf16" and meta["one"]["base"].get("quant_storage") != "bf16"


def test_every_sharded_checkpoint_reloads_and_serves_in_one_process(sharded):
    """Each checkpoint of the sharded sweep reloads with peftbench.load, a PEFT adapter also with plain PEFT (the
    same logits), and all of them serve from one process."""
    from fastapi.testclient import TestClient

    from peftbench.serve import create_app, load_adapters

    texts = ["股钱债涨跌", "星影歌剧综艺"]
    ckpts = {name: two["checkpoint"] for name, (_, two) in sharded.items()}
    for name, ckpt in ckpts.items():
        model, tokenizer, meta = peftbench.load(ckpt)
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**batch).logits
        assert logits.isfinite().all() and logits.shape == (2, 4), name
        if (Path(ckpt) / "adapter_config.json").is_file() and "4bit" not in name:  # plain PEFT reads it alike
            from peft import AutoPeftModelForSequenceClassification

            plain = AutoPeftModelForSequenceClassification.from_pretrained(
                ckpt, id2label=dict(enumerate(meta["model_labels"])), pad_token_id=tokenizer.pad_token_id,
                dtype="float32").eval()
            with torch.no_grad():
                torch.testing.assert_close(plain(**batch).logits, logits, atol=1e-5, rtol=0, msg=name)
    with TestClient(create_app(load_adapters(ckpts), "t" * 32)) as client:
        for name in ckpts:
            answer = client.post("/v1/classify", json={"adapter": name, "texts": texts},
                                 headers={"Authorization": "Bearer " + "t" * 32})
            assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, (name, answer.text)


# Fast checks of the launch, the refusals and the byte counts.


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
