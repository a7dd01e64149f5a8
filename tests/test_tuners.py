"""Every PEFT tuner type through the bridge (peftbench/methods/peft_tuner.py), checked against its status table;
the first-class tuner names and the LoRA variants (LoRA+, LoRA-FA, PiSSA, OLoRA)."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from peftbench import config
from peftbench.config import LoopConfig
from peftbench.errors import PeftbenchError
from peftbench.loop import build_optimizer, set_rates
from peftbench.methods import RunContext, get_method, is_head, set_trainable
from peftbench.methods.peft_tuner import KINDS, TESTED, TUNERS, UNTESTED, PeftTunerConfig, peft_types, status
from peftbench.methods.tuner_names import NAMED
from peftbench.models import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]

MODELS = {KINDS[0]: BertForSequenceClassification, KINDS[1]: BertForTokenClassification}
CASES = [(t, k) for t in sorted(TUNERS) for k in KINDS]


def tiny(kind: str):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, **TINY_CONFIG, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return MODELS[kind](config)


def batch(kind: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (8, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[4:, 9:] = 0  # padded rows
    labels = torch.randint(0, 3, (8,) if kind == KINDS[0] else (8, 12), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, labels


def bridged(peft_type: str, kind: str, **options):
    given = TUNERS.get(peft_type, TUNERS["LORA"]).tiny_options
    method = get_method("peft")(PeftTunerConfig(peft_type=peft_type, options={**given, **options}))
    ctx = RunContext(total_steps=100, num_labels=3, peft_task_type="SEQ_CLS" if kind == KINDS[0] else "TOKEN_CLS",
                     labels_per_token=kind == KINDS[1])
    return method, method.apply(tiny(kind), ctx)


def save_and_count(method, model, folder: Path) -> None:
    """Save the adapter; the bytes a run without a checkpoint records are its tensors' bytes."""
    from safetensors.torch import load_file

    method.save(model, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert method.saved_bytes(model) == sum(t.numel() * t.element_size() for t in tensors.values())


SERVED_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "VERA", "LN_TUNING", "LILY")  # each way to serve


@pytest.mark.slow  # 35 short runs and one server
def test_every_tested_type_runs_reloads_exports_and_serves(tmp_path):
    """Through peftbench itself, each tested type for classification: ``run`` writes its checkpoint,
    ``peftbench.load`` reloads it to the trained logits, one that merges exports to a folder transformers alone
    loads. One server answers as ``peftbench.load`` computes for a type of each way it serves one: on the shared
    base (LoRA, IA3, prompt, P-tuning), or as a model of its own (VeRA, which merges; LN tuning, whose head a
    merge once lost; LILY, which cannot merge); the rest load as these do."""
    import shutil

    import httpx
    from conftest import logits_here
    from test_serve import TOKEN, classify, start_server
    from transformers import AutoModelForSequenceClassification

    import peftbench
    from peftbench.export import export
    from peftbench.train import run

    texts, served, data = ["股钱债涨跌", "星影歌剧综艺的", "今天芯片与网络"], tmp_path / "adapters", tmp_path / "data"
    data.mkdir()  # a small task of its own: each run takes two steps and scores 8 examples
    for split, n in (("train", 16), ("dev", 8)):
        (data / f"{split}.json").write_text("".join(json.dumps({"text": texts[i % 3][i % 4:], "label": "abc"[i % 3]},
                                                               ensure_ascii=False) + "\n" for i in range(n)))
    wanted = {}
    for peft_type in [t for t in sorted(TUNERS) if status(t, KINDS[0]) == TESTED]:
        result = run(config.load(None, [
            "task.name=custom", f"task.data_dir={data}", "task.text_fields=[text]", "task.labels=[a, b, c]",
            "model.name_or_path=tiny", "train.batch_size=8", "train.max_steps=2", "train.measure_inference=false",
            "method.name=peft", f"method.peft_type={peft_type}",
            f"method.options={json.dumps(TUNERS[peft_type].tiny_options)}", f"output_dir={tmp_path / peft_type}"]))
        trained, ckpt = logits_here(result, texts), result.record["checkpoint"]
        model, tokenizer, meta = peftbench.load(ckpt)
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, trained, rtol=0, atol=1e-6, msg=peft_type)
            if TUNERS[peft_type].merges:
                plain = AutoModelForSequenceClassification.from_pretrained(export(ckpt, tmp_path / "hf" / peft_type))
                torch.testing.assert_close(plain.eval()(**inputs).logits, trained, rtol=0, atol=1e-5, msg=peft_type)
        if peft_type in SERVED_TYPES:
            shutil.copytree(ckpt, served / peft_type.lower())
            probs = trained.softmax(-1)
            wanted[peft_type.lower()] = [(meta["labels"][i], p.item()) for p, i in zip(*probs.max(-1))]
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)
    proc, url = start_server("--adapters-dir", str(served), "--token-file", str(tmp_path / "token"))
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
            assert len(wanted) == len(SERVED_TYPES)
            for name, want in wanted.items():
                response = classify(client, name, texts)
                assert response.status_code == 200, (name, response.text)
                got = [(p["label"], p["score"]) for p in response.json()["predictions"]]
                assert [g[0] for g in got] == [w[0] for w in want], name
                assert all(abs(g[1] - w[1]) <= 1e-5 for g, w in zip(got, want, strict=True)), name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_table_holds_every_type_of_the_installed_peft():
    assert sorted(TUNERS) == peft_types()
    tested = {k: sum(status(t, k) == TESTED for t in TUNERS) for k in KINDS}
    assert tested == {KINDS[0]: 35, KINDS[1]: 34}  # as docs/methods/peft.md says


def test_a_type_the_table_lacks_is_untested_not_gone(monkeypatch):
    monkeypatch.delitem(TUNERS, "VERA")
    assert status("VERA", KINDS[0]) == UNTESTED
    method, model = bridged("VERA", KINDS[0])  # still trains
    assert set_trainable(model, method)["trainable"] > 0


@pytest.mark.parametrize("peft_type, kind", [c for c in CASES if status(*c) != TESTED])
def test_a_refused_type_says_why_in_one_line(peft_type, kind):
    with pytest.raises(PeftbenchError) as err:
        bridged(peft_type, kind)
    assert str(err.value) == f"config key 'method.peft_type': {peft_type} for {kind} is {status(peft_type, kind)}"


def test_bad_options_name_the_key():
    with pytest.raises(PeftbenchError, match=r"config key 'method.options': .*(unexpected keyword|rank)"):
        bridged("LOHA", KINDS[0], rank=4)
    with pytest.raises(PeftbenchError, match=r"config key 'method.options': VBLORA on this model: .*vector_length"):
        bridged("VBLORA", KINDS[0], vector_length=256)  # 256 does not divide the tiny model's 128
    with pytest.raises(PeftbenchError, match="config key 'method.peft_type'"):
        PeftTunerConfig(peft_type="NOT_A_TUNER")
    for init in ("pissa", "pissa_niter_4", "OLoRA", "corda", "loftq"):  # through the bridge, not saved as plain LoRA
        with pytest.raises(PeftbenchError, match=r"config key 'method.options' must be without an init_lora_weights "
                                                 r"that rewrites the base weights .* use method.name=pissa"):
            PeftTunerConfig(peft_type="LORA", options={"init_lora_weights": init})
    assert PeftTunerConfig(peft_type="LORA", options={"init_lora_weights": "gaussian"}).options  # one that does not


@pytest.mark.slow  # 69 cases, under a second each
@pytest.mark.parametrize("peft_type, kind", [c for c in CASES if status(*c) == TESTED])
def test_every_tested_type_trains_reloads_in_plain_peft_and_merges(peft_type, kind, tmp_path):
    method, model = bridged(peft_type, kind)
    set_trainable(model, method)
    own = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and
           not is_head(n.removeprefix("base_model.model.")) and "modules_to_save" not in n}
    assert own, "the tuner trains nothing of its own"
    inputs, labels = batch(kind)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses, gradient = [], 0.0
    params = dict(model.named_parameters())
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        gradient += sum(float(params[n].grad.abs().sum()) for n in own if params[n].grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert gradient > 0, "no gradient reached the tuner's own tensors"  # (without weight decay, only it moves them)
    assert any(not torch.equal(before, params[n]) for n, before in own.items()), "its own tensors never moved"
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    save_and_count(method, model, tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(kind), str(tmp_path)).eval()  # plain PEFT, no peftbench
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=1e-6)
    assert method.makes_plain_model() == TUNERS[peft_type].merges
    if not TUNERS[peft_type].merges:  # as the table says: PEFT has no merge for it
        with pytest.raises((AttributeError, NotImplementedError)):
            reloaded.merge_and_unload()
    else:
        merged = reloaded.merge_and_unload()
        assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(merged(**inputs).logits, logits, rtol=0, atol=1e-5)


def named_run_context(kind: str = KINDS[0]) -> RunContext:
    return RunContext(total_steps=100, num_labels=3, peft_task_type="SEQ_CLS" if kind == KINDS[0] else "TOKEN_CLS",
                      labels_per_token=kind == KINDS[1])


@pytest.mark.parametrize("name, options", [(n, {}) for n in sorted(NAMED)] + [("lokr", {"r": 2})])
def test_first_class_tuners_train_the_parameters_their_formula_counts(name, options):
    named = NAMED[name]  # (LoKr at r = 2 factors its second Kronecker factor: the formula's other branch)
    method = get_method(name)(get_method(name).Config(options=options))
    assert method.cfg.peft_type == named.peft_type and (ROOT / f"docs/methods/{name}.md").exists()
    model = method.apply(tiny(KINDS[0]), named_run_context())
    params = set_trainable(model, method)
    head = TINY_CONFIG["hidden_size"] * 3 + 3
    if name == "ptuning":
        dims = [(TINY_CONFIG["hidden_size"], TINY_CONFIG["hidden_size"])]
    else:
        adapted = [model.get_submodule(n) for n in model.targeted_module_names]
        dims = [(m.normalized_shape[0],) * 2 if name == "lntuning" else (m.in_features, m.out_features)
                for m in (getattr(a, "base_layer", a) for a in adapted)]
    assert params["trainable"] == named.trained(dims, {**named.formula_options, **named.options, **options}) + head


def test_a_first_class_name_keeps_its_type():
    with pytest.raises(PeftbenchError, match="config key 'method.peft_type' must be VERA for method.name=vera"):
        config.load(None, ["method.name=vera", "method.peft_type=LOHA"])
    cfg = config.load(None, ["method.name=oft", "method.options={oft_block_size: 16}"])
    assert cfg.train.lr == get_method("oft").default_lr and cfg.method.options == {"oft_block_size": 16}


def lora_variant(name: str, **settings):
    cls = get_method(name)
    method = cls(cls.Config(**settings))
    model = method.apply(tiny(KINDS[0]), named_run_context())
    set_trainable(model, method)
    return method, model


def train_steps(method, model, steps: int, lr: float = 1e-2):
    """``steps`` optimizer steps through the loop's optimizer and its rate setting (each group's lr_scale)."""
    inputs, labels = batch(KINDS[0])
    optimizer = build_optimizer(model, LoopConfig(lr=lr, weight_decay=0.0), method.lr_scale)
    for _ in range(steps):
        set_rates(optimizer, lr)
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return inputs


def test_loraplus_moves_b_sixteen_times_as_far_as_lora_on_the_first_step():
    moved = {}
    for name in ("lora", "loraplus"):
        method, model = lora_variant(name)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        train_steps(method, model, 1)
        params = dict(model.named_parameters())
        moved[name] = torch.stack([(params[n] - b).abs().max() for n, b in before.items()])
    # Adam's first step moves every weight by about its rate: B's rate is 16 times A's (= LoRA's)
    torch.testing.assert_close(moved["loraplus"], 16 * moved["lora"], rtol=1e-4, atol=0)
    method, model = lora_variant("loraplus")
    scales = {g["lr_scale"] for g in build_optimizer(model, LoopConfig(), method.lr_scale).param_groups if g["params"]}
    assert scales == {1.0, 16.0}


@pytest.mark.parametrize("name", ["loraplus", "pissa", "olora"])
def test_the_lora_variants_train_loras_parameters(name):
    d, layers = TINY_CONFIG["hidden_size"], TINY_CONFIG["num_hidden_layers"]
    _, model = lora_variant(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == layers * 2 * 8 * (d + d) + d * 3 + 3


def test_lorafa_trains_b_only_and_counts_it(tmp_path):
    method, model = lora_variant("lorafa")
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert a_before and not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    d, layers = TINY_CONFIG["hidden_size"], TINY_CONFIG["num_hidden_layers"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == layers * 2 * 8 * d + d * 3 + 3
    inputs = train_steps(method, model, 3)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], a) for n, a in a_before.items())
    model.eval()
    save_and_count(method, model, tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(KINDS[0]), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_pissa_and_olora_save_plain_lora_on_the_unmodified_base(name, rslora, tmp_path):
    method, model = lora_variant(name, use_rslora=rslora)
    base_query = tiny(KINDS[0]).bert.encoder.layer[0].attention.self.query.weight
    rewritten = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert not torch.allclose(rewritten, base_query)  # W - B0 A0
    inputs = train_steps(method, model, 3, lr=1e-3)
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
    save_and_count(method, model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 16 and saved["init_lora_weights"] is True  # rank 2r, plain LoRA, the same scale:
    assert saved["lora_alpha"] == pytest.approx(16 * 2 ** 0.5 if rslora else 32)  # alpha/sqrt(r) or alpha/r kept
    reloaded = PeftModel.from_pretrained(tiny(KINDS[0]), str(tmp_path)).eval()  # the original base
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, logits, rtol=0, atol=1e-5)


def test_a_frozen_a_must_start_random():
    with pytest.raises(PeftbenchError, match="config key 'method.train_a' must be true with init other than"):
        config.load(None, ["method.name=pissa", "method.train_a=false"])


@pytest.mark.slow  # four plans
def test_plan_refuses_a_tuner_without_an_activation_formula_and_plans_the_lora_variants_as_lora():
    from peftbench import plan

    cfg = config.load(None, ["task.name=synthetic", "model.name_or_path=tiny"])
    with pytest.raises(PeftbenchError, match=r"peftbench plan: no activation formula for vera layers \(base_model"):
        plan.plan(cfg, ["vera"], device="a100")
    rows = plan.plan(cfg, ["lora", "pissa", "loraplus", "lorafa"], device="a100")["rows"]
    memory = [row["memory"] for row in rows]
    assert len({m["activations"] for m in memory[:3]}) == 1 and memory[0]["activations"] > 0  # LoRA's layers
    assert memory[3]["optimizer_state"] < memory[0]["optimizer_state"]  # LoRA-FA keeps no state for A
    assert memory[3]["activations"] < memory[0]["activations"]  # nor A's input


@pytest.mark.slow  # two runs
def test_loraplus_b_learns_sixteen_times_faster_through_the_loop(tmp_path):
    """One optimizer step of run(): B starts at zero, so after Adam's first step it is the rate times about
    sign(gradient); the same seed gives both runs the same gradient, and LoRA+'s B moves 16 times as far."""
    from peftbench.train import run

    b = {}
    for name in ("lora", "loraplus"):
        cfg = config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_train_samples=16",
                                 "train.batch_size=16", "train.max_steps=1", "train.warmup_ratio=0", "train.lr=1e-3",
                                 f"method.name={name}", "train.measure_inference=false", "train.evaluate_test=false",
                                 "train.save_checkpoint=false", f"output_dir={tmp_path / name}"])
        model = run(cfg).model
        b[name] = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])
    assert b["lora"].abs().max() > 0
    torch.testing.assert_close(b["loraplus"], 16 * b["lora"], rtol=1e-3, atol=1e-7)


def test_methods_all_lists_every_type_with_its_status(capsys):
    from peftbench.cli import main

    assert main(["methods", "--all"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    for peft_type in peft_types():
        cells = [status(peft_type, kind).split(":")[0] for kind in KINDS]
        assert lines[peft_type].split()[1:3] == cells, lines[peft_type]
        reason = status(peft_type, KINDS[0]) if cells[0] != TESTED else status(peft_type, KINDS[1])
        assert reason == TESTED or reason.removeprefix("refused: ") in lines[peft_type]


def test_methods_all_lists_a_type_the_table_lacks_as_untested(capsys, monkeypatch):
    from peftbench.cli import main

    monkeypatch.delitem(TUNERS, "VERA")
    assert main(["methods", "--all"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["VERA"])
    assert line.split()[1:3] == [UNTESTED, UNTESTED], line


def test_a_token_refusal_lifts_when_the_targets_are_named():
    assert status("OSF", KINDS[1]).startswith("refused") and status("OSF", KINDS[1], {"target_modules": []}) == TESTED
    method, model = bridged("OSF", KINDS[1], target_modules=["query", "value"])
    set_trainable(model, method)
    assert any("classifier" in n and p.requires_grad for n, p in model.named_parameters())
    inputs, labels = batch(KINDS[1])
    model(**inputs, labels=labels).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "osf" in n)
