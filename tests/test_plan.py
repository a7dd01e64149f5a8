"""The planner: its activation formula against what autograd saves, its weight/gradient/optimizer bytes against
the tensors of a real step, its recommendations and its command."""

import copy

import pytest
import torch

from peftbench import config, models, plan
from peftbench.cli import main
from peftbench.errors import PeftbenchError
from peftbench.methods import RunContext, get_method, set_trainable, settle_dtypes
from peftbench.train import run

METHODS = [("full", []), ("lora", []), ("adalora", []), ("ia3", []), ("prompt", []), ("prefix", []),
           ("prefix", ["method.reparameterize=false"]), ("adapter", []), ("adapter", ["method.variant=pfeiffer"]),
           ("adapter", ["method.variant=ffn"]), ("bitfit", []), ("lorafa", [])]
TOKENIZER = models.char_tokenizer(["北京欢迎你来上海看看"] * 3)


def adapted(base, name, overrides, precision="no"):
    model = copy.deepcopy(base)
    method = get_method(name)(config.load(None, [f"method.name={name}", *overrides]).method)
    model = method.apply(model, RunContext(total_steps=10, num_labels=4))
    set_trainable(model, method)
    settle_dtypes(model, precision)
    return model.train()


def inputs(batch, length, padded):
    torch.manual_seed(1)
    ids = torch.randint(5, len(TOKENIZER), (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        mask[0, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.zeros(batch, dtype=torch.long)}


@pytest.mark.parametrize("arch,shapes", [("tiny", ((2, 16), (2, 64), (8, 16), (8, 64))),
                                         ("random:mini", ((2, 16), (2, 64), (8, 16), (8, 64))),
                                         pytest.param("random:bert-base-chinese", ((2, 8), (2, 16), (4, 8), (4, 16)),
                                                      marks=pytest.mark.slow)])
def test_activation_formula_matches_autograd(arch, shapes):
    """Every method, two batch sizes, two lengths (batch 2 padded): the formula within 15 % of the saved bytes."""
    torch.manual_seed(0)
    base = models.load_model(config.ModelConfig(name_or_path=arch), ["0", "1", "2", "3"], TOKENIZER)[0]
    errors = {}
    for name, overrides in METHODS:
        model = adapted(base, name, overrides)
        for batch, length in shapes:
            real = plan.count_saved(model, inputs(batch, length, padded=batch == 2))
            predicted = plan.activations(model, batch, length, "cpu", "no", padded=batch == 2)["saved"]
            errors[(name, *overrides, batch, length)] = predicted / real - 1
    assert max(abs(e) for e in errors.values()) < 0.15, errors
    assert len(errors) == 4 * len(METHODS)


@pytest.mark.parametrize("mode", ["bf16", "checkpointing"])
def test_activation_formula_under_autocast_and_checkpointing(mode):
    torch.manual_seed(0)
    base = models.load_model(config.ModelConfig(name_or_path="random:mini"), ["0", "1", "2", "3"], TOKENIZER)[0]
    errors = {}
    for name, overrides in METHODS:
        model = adapted(base, name, overrides, "bf16" if mode == "bf16" else "no")
        if mode == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        real = plan.count_saved(model, inputs(4, 24, padded=True), torch.bfloat16 if mode == "bf16" else None)
        predicted = plan.activations(model, 4, 24, "cpu", "bf16" if mode == "bf16" else "no",
                                     checkpointing=mode == "checkpointing")
        errors[(name, *overrides)] = predicted["saved"] / real - 1
        assert (predicted["recompute"] > 0) == (mode == "checkpointing")
    assert max(abs(e) for e in errors.values()) < 0.15, errors


DECODER_METHODS = [m for m in METHODS if m != ("adapter", ["method.variant=pfeiffer"])]  # Pfeiffer needs post-LN


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_activation_formula_matches_autograd_on_decoders(family):
    """Pre-norm decoders (RMSNorm, rotary, gated MLP, grouped KV heads): every method, two batch sizes, two
    lengths (batch 2 padded: SDPA then takes a mask and repeated KV heads), fp32; bf16 autocast and gradient
    checkpointing at one shape."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForSequenceClassification),
                                 "llama": (LlamaConfig, LlamaForSequenceClassification)}[family]
    torch.manual_seed(0)
    base = model_class(config_class(vocab_size=len(TOKENIZER), hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, intermediate_size=176,
                                    pad_token_id=0, num_labels=4))
    errors = {}
    for name, overrides in DECODER_METHODS:
        for mode, shapes in (("no", ((2, 16), (2, 64), (8, 16), (8, 64))), ("bf16", ((2, 24),)),
                             ("checkpointing", ((2, 24),))):
            model = adapted(base, name, overrides, "bf16" if mode == "bf16" else "no")
            if mode == "checkpointing":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for batch, length in shapes:
                given = inputs(batch, length, padded=batch == 2)
                del given["token_type_ids"]  # decoders take none
                real = plan.count_saved(model, given, torch.bfloat16 if mode == "bf16" else None)
                predicted = plan.activations(model, batch, length, "cpu", "bf16" if mode == "bf16" else "no",
                                             checkpointing=mode == "checkpointing", padded=batch == 2)["saved"]
                errors[(name, *overrides, mode, batch, length)] = predicted / real - 1
    assert max(abs(e) for e in errors.values()) < 0.15, errors
    assert len(errors) == 6 * len(DECODER_METHODS)


@pytest.mark.parametrize("method,precision", [("full", "no"), ("lora", "bf16"), ("prefix", "no"),
                                              ("bitfit", "bf16")])
def test_weight_gradient_optimizer_bytes_are_exact(tmp_path, method, precision):
    """The meta-device model's bytes equal the real run's tensors after its optimizer steps."""
    cfg = config.load(None, ["task.name=synthetic", f"method.name={method}", "task.max_train_samples=64",
                             "train.max_steps=2", "train.batch_size=16", f"train.mixed_precision='{precision}'",
                             "train.save_checkpoint=false", "train.measure_inference=false",
                             f"output_dir={tmp_path}"])
    result = run(cfg)
    model = result.model
    vocab = model.get_input_embeddings().num_embeddings
    predicted = plan.static_bytes(plan.meta_model(cfg, vocab, 4, 2))
    params = {id(p): p for p in model.parameters()}.values()
    assert predicted["trained_weights"] == sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    assert predicted["base_weights"] == result.record["params"]["frozen_weight_bytes"]
    assert predicted["trained_weights"] == result.record["params"]["trained_weight_bytes"]
    grads = [p.grad for p in params if p.requires_grad]
    assert all(g is None for g in grads)  # zeroed after the step; their size is the trained weights' size
    assert predicted["gradients"] == predicted["trained_weights"]


def test_optimizer_state_bytes_are_exact():
    model = models.load_model(config.ModelConfig(), ["0", "1"], TOKENIZER)[0]
    model = adapted(model, "lora", [])
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    for p in trained:
        p.grad = torch.ones_like(p)
    optimizer.step()
    real = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())
    assert plan.static_bytes(model)["optimizer_state"] == real
    assert plan.static_bytes(model)["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trained)


def test_quantized_base_bytes():
    torch.manual_seed(0)
    model = adapted(models.load_model(config.ModelConfig(), ["0", "1"], TOKENIZER)[0], "lora", [])
    full = plan.static_bytes(model)["base_weights"]
    eight, four = plan.quantized_bytes(model, "8bit"), plan.quantized_bytes(model, "4bit")
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and "classifier" not in n)
    assert full - eight == pytest.approx(3 * linear, rel=0.02)  # fp32 -> one byte, plus row scales
    assert eight - four == pytest.approx(linear / 2, rel=0.05)


def test_recommendation_fits_the_budget():
    cfg = config.load(None, ["task.name=synthetic", "method.name=full", "train.batch_size=64",
                             "model.name_or_path=random:mini"])
    at_will = plan.plan(cfg, ["full", "lora"], device="a100")["rows"]
    full = at_will[0]["memory"]
    assert at_will[0]["fits"] and at_will[0]["recommend"] is None
    static = full["total"] - full["activations"]
    budget = static + full["activations"] // 3
    tight = plan.plan(cfg, ["full"], device="a100", memory=budget)["rows"][0]
    assert not tight["fits"] and tight["recommend_total"] <= budget
    assert "train.gradient_checkpointing=true" in tight["recommend"] or "train.batch_size=32" in tight["recommend"]
    assert "model.quantization=none" in tight["recommend"]  # full fine-tuning cannot use a quantised base
    lora = plan.plan(cfg, ["lora"], device="a100", memory=2**20)["rows"][0]
    assert lora["recommend"].startswith("nothing fits") or "quantization=4bit" in lora["recommend"]


def test_recommendation_never_quantises_a_base_the_method_rewrites():
    """PiSSA rewrites the frozen weights, which a quantised base holds only approximately (the run refuses it):
    at a budget LoRA meets only on a quantised base, PiSSA's plan says nothing fits."""
    recipe = ["task.name=synthetic", "train.batch_size=64", "model.name_or_path=random:mini"]
    cheapest = config.load(None, [*recipe, "method.name=lora", "model.quantization=4bit", "train.batch_size=1",
                                  "train.grad_accum_steps=64", "train.gradient_checkpointing=true"])
    budget = plan.plan(cheapest, ["lora"], device="a100")["rows"][0]["memory"]["total"]
    cfg = config.load(None, recipe)
    lora, pissa = plan.plan(cfg, ["lora", "pissa"], device="a100", memory=budget)["rows"]
    assert "model.quantization=" in lora["recommend"] and "quantization=none" not in lora["recommend"]
    assert pissa["recommend"].startswith("nothing fits")


def test_a_quantised_recipe_keeps_its_bits_while_smaller_settings_are_tried():
    """A 4-bit recipe over its budget: a smaller batch on the same 4-bit base, not a float one."""
    recipe = ["task.name=synthetic", "model.name_or_path=random:mini", "method.name=lora", "model.quantization=4bit"]
    cheapest = config.load(None, [*recipe, "train.batch_size=1", "train.grad_accum_steps=64",
                                  "train.gradient_checkpointing=true"])
    budget = plan.plan(cheapest, ["lora"], device="a100")["rows"][0]["memory"]["total"]
    (row,) = plan.plan(config.load(None, [*recipe, "train.batch_size=64"]), ["lora"], device="a100",
                       memory=budget)["rows"]
    assert not row["fits"] and row["recommend"].endswith("model.quantization=4bit"), row["recommend"]


def test_adalora_is_planned_over_the_steps_the_run_takes():
    """AdaLoRA's schedule is set from the run's step count (epochs × steps per epoch when max_steps is -1), so the
    planner refuses what the run refuses."""
    cfg = config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "method.name=adalora",
                             "method.tinit_ratio=0.5", "method.tfinal_ratio=0.5"])
    with pytest.raises(PeftbenchError, match="steps leave no pruning phase"):
        plan.plan(cfg, ["adalora"], device="a100")


def test_plan_command(capsys):
    assert main(["plan", "task.name=synthetic", "--methods", "all", "--memory", "1GiB", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and "| prefix |" in out and "activations MiB" in out and "| yes |" in out
    assert "precision no, base weights fp32" in out
    assert main(["plan", "task.name=synthetic", "model.quantization=8bit", "--device", "a100"]) == 0
    assert "base weights 8-bit (LLM.int8)" in capsys.readouterr().out
    assert main(["plan", "task.name=synthetic", "train.mixed_precision=bf16", "--device", "t4"]) == 2
    assert "T4 has no bf16" in capsys.readouterr().err
    assert main(["plan", "task.name=synthetic", "--memory", "lots"]) == 2
    assert "--memory" in capsys.readouterr().err
    assert plan.parse_bytes("80GiB") == 80 * 2**30 and plan.parse_bytes("24GB") == 24 * 10**9
    for bad in ("1.2.3GB", "-5GB", "0", "GB", "nanGB", "infGB"):  # one line each, not a traceback or a budget
        with pytest.raises(PeftbenchError, match="is not a size of at least one byte"):
            plan.parse_bytes(bad)


def test_plan_refuses_a_family_without_formula(tmp_path):
    from transformers import GPT2Config

    GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, pad_token_id=0).save_pretrained(tmp_path)
    cfg = config.load(None, ["task.name=synthetic", f"model.name_or_path={tmp_path}", "method.name=lora",
                             "method.target_modules=[c_attn]"])
    with pytest.raises(PeftbenchError, match="no activation formula for model type 'gpt2'"):
        plan.meta_model(cfg, len(TOKENIZER), 2, 10)


def test_per_process_bytes_follow_the_strategy():
    """ddp keeps everything whole; zero2 splits gradients and optimizer state; fsdp and zero3 split the weights
    too, row by row (the first process holds the rounded-up share); AdaLoRA's trained tensors stay whole."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 3))
    model[0].requires_grad_(False)
    whole = plan.static_bytes(model)
    assert whole == {"base_weights": 4 * (20 + 5), "trained_weights": 4 * (15 + 3), "gradients": 4 * 18,
                     "optimizer_state": 2 * 4 * 18 + 2 * 4}
    assert plan.static_bytes(model, 2, "ddp") == whole
    rows = {"weight0": 3 * 4, "bias0": 3, "weight1": 2 * 5, "bias1": 2}  # ceil(5/2)=3 rows of 4, ceil(3/2)=2 rows of 5
    zero2 = plan.static_bytes(model, 2, "zero2")
    assert zero2["base_weights"] == whole["base_weights"]
    assert zero2["gradients"] == 4 * (rows["weight1"] + rows["bias1"])
    fsdp = plan.static_bytes(model, 2, "fsdp")
    assert fsdp == plan.static_bytes(model, 2, "zero3")
    assert fsdp["base_weights"] == 4 * (rows["weight0"] + rows["bias0"]) and fsdp["gradients"] == zero2["gradients"]
    kept = plan.static_bytes(model, 2, "fsdp", whole_trained=True)
    assert kept["trained_weights"] == whole["trained_weights"] and kept["base_weights"] == fsdp["base_weights"]
