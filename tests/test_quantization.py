"""Quantised bases (bitsandbytes LLM.int8 and 4-bit, which run on CPU) under every method that trains no base weight."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import LR, logits_here, logits_in_new_process

import peftbench
from peftbench import config, models
from peftbench.errors import PeftbenchError
from peftbench.methods import RunContext, get_method, method_names, set_trainable
from peftbench.train import run

pytest.importorskip("bitsandbytes")
PEFT_METHODS = [m for m in method_names(presets=False) if not get_method(m).trains_base_weights]
TEXTS = ["股钱债涨跌", "星影歌剧综艺的"]


def quantized_config(method, quantization, out_dir, *extra):
    lr = LR[get_method(method).preset_of or method]  # a preset (LoftQ) trains at its method's rate
    return config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48", "train.epochs=6",
                              f"method.name={method}", f"train.lr={lr}", f"model.quantization={quantization}",
                              "train.measure_inference=false", f"output_dir={out_dir}", *extra])


# On the 8-bit base, 80 steps of 16 over 320 examples (as tests/conftest.py's variants); prefix and prompt, which
# learn slower from a random backbone, 3 epochs of 32 over all 1000
INT8_STEPS = {"prefix": ["train.epochs=3"], "prompt": ["train.epochs=3"]}


@pytest.fixture(scope="module")
def int8_runs(tmp_path_factory):
    short = ["task.max_train_samples=320", "train.batch_size=16", "train.epochs=4"]
    return {m: run(quantized_config(m, "8bit", tmp_path_factory.mktemp(m), *INT8_STEPS.get(m, short)))
            for m in PEFT_METHODS}


def test_full_fine_tuning_of_a_quantised_base_is_refused():
    with pytest.raises(PeftbenchError, match=r"'method.name=full' and 'model.quantization=8bit' conflict: full trains"):
        config.load(None, ["method.name=full", "model.quantization=8bit"])


@pytest.mark.parametrize(("key", "value"), [("quantization", "int4"), ("quant_4bit_type", "int4"),
                                            ("quant_4bit_compute_dtype", "fp8")])
def test_bad_quantisation_values_name_the_key(key, value):
    with pytest.raises(PeftbenchError, match=f"config key 'model.{key}' must be"):
        config.load(None, [f"model.{key}={value}"])


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_method_trains_on_an_8bit_base(int8_runs, method):
    rec = int8_runs[method].record
    assert rec["status"] == "success"
    assert rec["metrics"]["accuracy"] > 0.45 and rec["metrics"]["test_accuracy"] > 0.45, rec["metrics"]  # chance 0.25
    assert rec["precision"]["quantization"] == "8bit" and rec["precision"]["mixed_precision"] == "no"


def test_8bit_base_stores_int8_linear_weights_and_a_float_head(int8_runs):
    model = int8_runs["lora"].model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    query = next(n for n in dtypes if n.endswith("attention.self.query.base_layer.weight"))
    assert dtypes[query] == torch.int8
    head = [n for n in dtypes if "classifier" in n and "modules_to_save" in n]
    assert head and all(dtypes[n] == torch.float32 for n in head)
    assert all(dtypes[n] == torch.float32 for n in dtypes if "pooler" in n)


def test_record_states_the_bytes_the_base_occupies(int8_runs, tmp_path):
    fp32 = run(quantized_config("lora", "none", tmp_path, "train.max_steps=2", "train.save_checkpoint=false"))
    int8 = int8_runs["lora"].record
    assert int8["params"]["total"] == fp32.record["params"]["total"]
    q, f = int8["precision"]["base_weight_bytes"], fp32.record["precision"]["base_weight_bytes"]
    model = fp32.model.base_model.model
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "classifier" not in n and "pooler" not in n and "lora" not in n)
    rows = sum(m.weight.shape[0] for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "classifier" not in n and "pooler" not in n and "lora" not in n)
    assert f - q == 3 * linear - 4 * rows  # each quantised weight: 4 bytes -> 1, plus one fp32 scale per row


def test_quantised_checkpoints_reload_to_identical_logits(int8_runs, tmp_path):
    reloaded = logits_in_new_process({m: r.record["checkpoint"] for m, r in int8_runs.items()}, TEXTS, tmp_path)
    for method, result in int8_runs.items():
        here = logits_here(result, TEXTS)
        # AdaLoRA reloads with its pruned ranks removed instead of masked: the same sum in another order, and
        # LLM.int8 rounds each layer's activations to 1/127 of their range, so a last-bit difference can move
        # a later layer's rounding. The prediction must not change, the logits only within that rounding.
        atol = 5e-2 if method == "adalora" else 1e-5
        torch.testing.assert_close(reloaded[method], here, atol=atol, rtol=0, msg=method)
        assert torch.equal(reloaded[method].argmax(-1), here.argmax(-1)), method
    with pytest.raises(PeftbenchError, match="trained on a 8bit base; merging would quantise the updated weights"):
        peftbench.load(int8_runs["lora"].record["checkpoint"], merge=True)  # not the trained model


def test_random_base_is_saved_in_float_and_quantised_on_reload(int8_runs):
    ckpt = int8_runs["lora"].record["checkpoint"]
    base = json.loads(Path(ckpt, "base", "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in base
    meta = json.loads(Path(ckpt, "peftbench.json").read_text(encoding="utf-8"))
    assert meta["config"]["model"]["quantization"] == "8bit"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_4bit_nf4_base_trains(method, tmp_path):
    # at 1e-2 prefix tuning diverges on some seeds, any base; it needs every example (dev 0.58 on 320 of them, 0.79
    # on all); LoRA (0.89) and adapters (0.79) clear 0.45 on 320 examples in half the time
    steps = ["train.lr=5e-3"] if method == "prefix" else ["task.max_train_samples=320", "train.batch_size=16"]
    result = run(quantized_config(method, "4bit", tmp_path, "model.quant_4bit_double=true",
                                  "model.quant_4bit_compute_dtype=fp32", "train.save_checkpoint=false", *steps))
    rec = result.record
    assert rec["metrics"]["accuracy"] > 0.45, rec["metrics"]
    assert rec["precision"]["quantization"] == "4bit-nf4-fp32+double"
    weights = [p for n, p in result.model.named_parameters()
               if n.endswith(("intermediate.dense.weight", "intermediate.dense.base_layer.weight"))]
    assert weights and all(p.dtype == torch.uint8 and p.numel() == 128 * 512 // 2 for p in weights)  # two per byte
    # Six epochs, each evaluated: evaluation left every 4-bit layer on the training path (on a CPU with
    # AVX512-BF16, bitsandbytes would otherwise repack the weights for inference only, and training would fail).
    layers = [m for m in result.model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert len(rec["dev_history"]) == 6
    cfg = config.resolve(rec["config"])  # counted as on the float base: a 4-bit weight is one weight, not half
    float_model, _ = models.load_model(replace(cfg.model, quantization="none"), list("0123"), result.tokenizer)
    plain = get_method(method)(cfg.method)
    counts = set_trainable(plain.apply(float_model, RunContext(100, 4, "SEQ_CLS")), plain)
    assert (rec["params"]["total"], rec["params"]["trainable"]) == (counts["total"], counts["trainable"])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_8bit_base_under_bf16_autocast_trains(method, tmp_path):
    """IA3's bitsandbytes layers hand fp32 activations to the next layer norm on CPU; norms stay fp32 for that.
    (bf16 is slow on CPUs without bf16 units: a few steps, then the evaluation that crashed.)"""
    rec = run(quantized_config(method, "8bit", tmp_path, "train.mixed_precision=bf16", "train.max_steps=4",
                               "train.save_checkpoint=false")).record
    assert rec["status"] == "success" and rec["precision"]["mixed_precision"] == "bf16"
    assert rec["precision"]["base_weight_bytes"] < rec["params"]["total"] * 2  # int8 linears, bf16 embeddings


def test_gradient_checkpointing_on_an_8bit_base_trains_identically(tmp_path):
    common = ["train.max_steps=6", "train.save_checkpoint=false", "train.log_every=1"]
    plain = run(quantized_config("lora", "8bit", tmp_path / "plain", *common))
    ckpt = run(quantized_config("lora", "8bit", tmp_path / "ckpt", "train.gradient_checkpointing=true", *common))
    torch.testing.assert_close(logits_here(ckpt, TEXTS), logits_here(plain, TEXTS), atol=1e-5, rtol=0)


def loftq_start(tmp_path):
    """The tiny base in float and in 4-bit from one random init (one seed), and LoftQ applied to the 4-bit one."""
    cfg = quantized_config("loftq", "4bit", tmp_path, "model.quant_4bit_compute_dtype=fp32")
    tokenizer = models.load_tokenizer(cfg.model, TEXTS)
    built = {}
    for quantization in ("none", "4bit"):
        torch.manual_seed(0)
        built[quantization] = models.load_model(replace(cfg.model, quantization=quantization), list("0123"), tokenizer)
    (float_model, _), (quantized, base) = built["none"], built["4bit"]
    method = get_method("loftq")(cfg.method)
    return float_model.eval(), method.apply(quantized, RunContext(100, 4, float_weight=base.float_weight)).eval(), \
        tokenizer


def test_loftq_starts_from_the_best_rank_r_correction_of_the_4bit_error(tmp_path):
    import bitsandbytes.functional as bnb_functional

    float_model, model, tokenizer = loftq_start(tmp_path)
    floats = dict(float_model.named_parameters())
    layers = [(n.removeprefix("base_model.model."), m) for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert len(layers) == 2 * 2  # query and value of both layers
    for name, layer in layers:
        quantized = layer.get_base_layer().weight
        error = floats[f"{name}.weight"] - bnb_functional.dequantize_4bit(quantized.data, quantized.quant_state)
        left = error - layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        tail = torch.linalg.svdvals(error)[8:]  # Eckart-Young: the least a rank-8 correction can leave
        assert left.norm().item() == pytest.approx(tail.norm().item(), rel=1e-4), name
        assert left.norm() < 0.95 * error.norm(), name
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        wanted = float_model(**inputs).logits
        with model.disable_adapter():  # plain LoRA's start (B = 0): the 4-bit base alone
            plain = model(**inputs).logits
        started = model(**inputs).logits
    assert (started - wanted).norm() < (plain - wanted).norm()


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_a_base_rewriting_start_is_refused_on_a_quantised_base(name):
    with pytest.raises(PeftbenchError, match=f"config keys 'method.init={name}' and 'model.quantization=4bit' "
                                             f"conflict: {name} rewrites the base weights"):
        config.load(None, [f"method.name={name}", "model.quantization=4bit"])


def test_loftq_needs_a_4bit_base():
    for overrides in (["method.name=loftq"], ["method.name=lora", "method.init=loftq", "model.quantization=8bit"]):
        with pytest.raises(PeftbenchError, match=r"config keys 'method.init=loftq' and 'model.quantization=(none|8bit)'"
                                                 r" conflict: LoftQ starts A and B from the error of 4-bit base"):
            config.load(None, overrides)


def test_loftq_reads_float_weights_from_a_sharded_bare_encoder(tmp_path):
    """A bare encoder (names without ``bert.``) saved in several safetensors shards: the 4-bit classifier loaded
    from it reads each of its weights back by the classifier's names; a folder without safetensors says so."""
    from transformers import BertConfig, BertModel

    from peftbench.models import TINY_CONFIG

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=64, **TINY_CONFIG))
    encoder.save_pretrained(tmp_path / "bare", max_shard_size="200KB")
    assert (tmp_path / "bare" / "model.safetensors.index.json").is_file()
    cfg = quantized_config("loftq", "4bit", tmp_path, f"model.name_or_path={tmp_path / 'bare'}")
    model, base = models.from_pretrained(tmp_path / "bare", cfg.model, list("0123"), encoder.config.pad_token_id)
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert query in dict(model.named_parameters())
    assert torch.equal(base.float_weight(query), encoder.encoder.layer[1].attention.self.query.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftbenchError, match="empty: no model.safetensors .* LoftQ needs"):
        models.float_weights(tmp_path / "empty", model)(query)


def test_a_random_init_4bit_base_keeps_its_float_file_while_it_lives(tmp_path, monkeypatch):
    """A random-init backbone is quantised from a float file that LoftQ reads back: it stays on disk while the base
    lives, and goes with it (a sweep process loads many), not only when the process ends."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = quantized_config("loftq", "4bit", tmp_path)
    tokenizer = models.load_tokenizer(cfg.model, TEXTS)
    built = {}
    for quantization in ("none", "4bit"):
        torch.manual_seed(0)
        built[quantization] = models.load_model(replace(cfg.model, quantization=quantization), list("0123"), tokenizer)
    (float_model, _), (model, base) = built.pop("none"), built.pop("4bit")
    (folder,) = (tmp_path / "tmp").iterdir()
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(base.float_weight(query), float_model.get_parameter(query))
    del model, base
    gc.collect()
    assert not folder.exists()


def test_loftq_plans_as_lora(tmp_path):
    from peftbench import plan

    cfg = quantized_config("loftq", "4bit", tmp_path)
    (row,) = plan.plan(cfg, ["loftq"], device="a100")["rows"]
    assert row["memory"]["activations"] > 0


@pytest.mark.slow  # one run
def test_loftq_trains_on_a_4bit_base_and_reloads_as_plain_lora(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run(quantized_config("loftq", "4bit", tmp_path, "model.quant_4bit_compute_dtype=fp32",
                                  "task.max_train_samples=320", "train.batch_size=16"))
    assert result.record["metrics"]["accuracy"] > 0.45, result.record["metrics"]
    ckpt = Path(result.record["checkpoint"])
    saved = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["init_lora_weights"] is True and saved["r"] == 8  # a plain LoRA on the plain 4-bit base
    here = logits_here(result, TEXTS)
    torch.testing.assert_close(logits_in_new_process({"loftq": ckpt}, TEXTS, tmp_path)["loftq"], here, atol=1e-5,
                               rtol=0)
    cfg = config.resolve(result.record["config"])
    base = AutoModelForSequenceClassification.from_pretrained(ckpt / "base", dtype=torch.float32,
                                                              quantization_config=models.quantization_config(cfg.model))
    models.keep_4bit_training_layout(base)  # else, on a CPU with AVX512-BF16, bitsandbytes infers in bf16
    plain = PeftModel.from_pretrained(base, str(ckpt)).eval()  # PEFT and transformers load the adapter alone
    with torch.no_grad():
        torch.testing.assert_close(plain(**result.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, here,
                                   atol=1e-5, rtol=0)


def test_quantisation_settings_reach_bitsandbytes():
    cfg = config.load(None, ["method.name=lora", "model.quantization=4bit", "model.quant_4bit_type=fp4",
                             "model.quant_4bit_compute_dtype=fp16", "model.quant_4bit_double=true"]).model
    q = models.quantization_config(cfg)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_compute_dtype == torch.float16
    assert q.bnb_4bit_use_double_quant and "classifier" in q.llm_int8_skip_modules
    assert models.quantization_name(cfg) == "4bit-fp4-fp16+double"


@pytest.mark.slow
def test_precision_matrix_runs_every_cell_and_refuses_full_on_a_quantised_base(capsys):
    import precision_matrix

    precision_matrix.main(["--arch", "tiny", "--methods", "full,lora", "--precisions", "no,bf16", "--quantizations",
                           "none,8bit", "--steps", "3", "--batch-size", "8"])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny")]
    status = {(r[1], r[2], r[3]): r[4] for r in rows}
    assert len(status) == 8
    assert {k: v for k, v in status.items() if v != "ok"} == {("full", "no", "8bit"): "refused",
                                                              ("full", "bf16", "8bit"): "refused"}
