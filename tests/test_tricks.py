"""The training tricks (peftbench/tricks): each one is checked to be on, and to do what its paper says, on a tiny
BERT; end-to-end runs check that they reach the loop, the saved checkpoint and the record."""

import json
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from peftbench import config, tricks
from peftbench.checkpoint import CHECKPOINT_DIR
from peftbench.errors import PeftbenchError
from peftbench.loop import build_optimizer
from peftbench.train import run

LAYERS = 3


def tiny(kind: str = "sequence", dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    return (BertForSequenceClassification if kind == "sequence" else BertForTokenClassification)(cfg)


def lora(model):
    """LoRA on query and value: frozen embeddings, as every PEFT method has them."""
    return get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


def batch(kind: str = "sequence", n: int = 4, length: int = 10, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # one padded example
    if kind == "sequence":
        labels = torch.randint(0, 3, (n,), generator=g)
    else:
        labels = torch.randint(0, 3, (n, length), generator=g)
        labels[mask == 0] = -100
        labels[:, 0] = -100  # [CLS]
    return {"inputs": {"input_ids": ids, "attention_mask": mask}, "labels": labels}


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_label_smoothing_is_torch_smoothed_cross_entropy(kind):
    model, b = tiny(kind).eval(), batch(kind)
    logits = model(**b["inputs"]).logits
    expected = F.cross_entropy(logits.reshape(-1, 3), b["labels"].reshape(-1), label_smoothing=0.2)
    loss = tricks.objective(0.2, 0.0)(model, b)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, tricks.plain_loss(model, b), atol=1e-4)  # it is on


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_rdrop_runs_two_dropout_passes_and_adds_their_symmetric_kl(kind):
    model, b = tiny(kind, dropout=0.3).train(), batch(kind)
    torch.manual_seed(5)
    loss = tricks.objective(0.0, 2.0)(model, b)
    torch.manual_seed(5)  # the same dropout masks: the doubled batch, by hand
    doubled = {k: torch.cat([v, v]) for k, v in b["inputs"].items()}
    out = model(**doubled, labels=torch.cat([b["labels"], b["labels"]]))
    first, second = out.logits.chunk(2)
    kept = (b["labels"] != -100).reshape(-1)
    p = torch.softmax(first.reshape(-1, 3)[kept], -1)
    q = torch.softmax(second.reshape(-1, 3)[kept], -1)
    assert (p - q).abs().max() > 1e-3  # the two passes differ
    kl = 0.5 * ((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean()
    assert kl > 0
    assert torch.allclose(loss, out.loss + 2.0 * kl, atol=1e-5)
    torch.manual_seed(5)
    with_smoothing = tricks.objective(0.1, 2.0)(model, b)  # the two compose
    assert torch.allclose(with_smoothing, loss + tricks.label_smoothing.smoothing_term(out.logits, torch.cat(
        [b["labels"], b["labels"]]), 0.1), atol=1e-5)


def adversarial_step(model, b, kind, **options):
    """A clean backward, then the adversary's losses, as the loop runs them; returns (clean loss, adversarial
    losses, the perturbations used, the adversary)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    t = config.TrainConfig(adversarial=kind, **options)
    seen = []

    def watched(m, batch_):
        if adversary.delta is not None:
            seen.append(adversary.delta.clone())
        return tricks.plain_loss(m, batch_)

    loop = tricks.loop_tricks(t, model, trained)
    adversary = loop.adversary
    loop.objective = watched
    clean = loop.objective(model, b)
    clean.backward()
    losses = []
    for loss in loop.adversarial_losses(model, b):
        loss.backward()
        losses.append(loss.detach())
    return clean.detach(), losses, seen, adversary


def test_fgm_perturbs_frozen_embeddings_by_epsilon_up_the_loss():
    model, b = lora(tiny()).eval(), batch()
    model.train()  # the adversary acts in training forwards only; dropout is 0
    embedding = model.get_input_embeddings()
    assert not embedding.weight.requires_grad
    clean, losses, seen, _ = adversarial_step(model, b, "fgm", adversarial_epsilon=0.05)
    assert len(losses) == 1 and len(seen) == 1
    norms = seen[0].flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 0.05), atol=1e-6)  # per example
    assert losses[0] > clean  # along the gradient, the loss rises


def test_fgm_gradient_is_the_clean_plus_the_adversarial_one():
    model, b = tiny().train(), batch()
    clean, losses, seen, adversary = adversarial_step(model, b, "fgm", adversarial_epsilon=0.5)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    tricks.plain_loss(model, b).backward()
    adversary.delta = seen[0]
    tricks.plain_loss(model, b).backward()
    adversary.delta = None
    for name, p in model.named_parameters():
        assert torch.allclose(got[name], p.grad, atol=1e-6), name


def test_pgd_climbs_in_steps_inside_the_ball_and_keeps_only_the_last_gradient():
    model, b = lora(tiny()).train(), batch()
    trained = [p for p in model.parameters() if p.requires_grad]
    clean, losses, seen, adversary = adversarial_step(model, b, "pgd", adversarial_epsilon=0.1,
                                                      adversarial_steps=3, adversarial_alpha=0.04)
    assert len(losses) == 3 and len(seen) == 3
    norms = [d.flatten(1).norm(dim=1) for d in seen]
    assert torch.allclose(norms[0], torch.full_like(norms[0], 0.04), atol=1e-6)
    assert all((n <= 0.1 + 1e-6).all() for n in norms) and (norms[2] > 0.1 - 1e-3).any()  # projected
    assert clean < losses[0] < losses[2]
    got = [p.grad.clone() for p in trained]
    model.zero_grad()
    tricks.plain_loss(model, b).backward()  # clean + the last step's: the middle steps only found the direction
    adversary.delta = seen[2]
    tricks.plain_loss(model, b).backward()
    adversary.delta = None
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(got, trained))


def test_the_adversary_leaves_evaluation_alone():
    model, b = tiny(), batch()
    adversarial_step(model.train(), b, "fgm")
    model.eval()
    with torch.no_grad():
        before = model(**b["inputs"]).logits
    loop = tricks.loop_tricks(config.TrainConfig(adversarial="fgm"), model, list(model.parameters()))
    loop.adversary.delta = torch.ones(4, 10, 32)  # would show if the hook acted
    with torch.no_grad():
        assert torch.equal(model(**b["inputs"]).logits, before)


def test_ema_follows_its_formula_with_warm_up_and_swaps():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = tricks.EMA({"w": p}, decay=0.9)
    expected = torch.zeros(3)
    for n in range(1, 40):
        with torch.no_grad():
            p.add_(1.0)
        ema.on_optimizer_step()
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * p.detach()
    assert torch.allclose(ema.average["w"], expected)
    raw = p.detach().clone()
    ema.swap()
    assert torch.allclose(p.detach(), expected) and torch.equal(ema.average["w"], raw)
    ema.swap()
    assert torch.equal(p.detach(), raw)


def test_swa_is_the_mean_of_the_last_k_evaluations():
    p = torch.nn.Parameter(torch.zeros(2))
    swa = tricks.SnapshotMean({"w": p}, last=3)
    for value in (1.0, 2.0, 3.0, 10.0):
        with torch.no_grad():
            p.fill_(value)
        swa.on_eval()
    assert torch.allclose(swa.average["w"], torch.full((2,), 5.0))  # (2 + 3 + 10) / 3


def test_layer_decay_gives_each_layer_its_rate_and_composes_with_a_methods_scale():
    model = lora(tiny())
    for p in model.base_model.model.bert.embeddings.parameters():
        p.requires_grad_(True)
    scale = tricks.layer_scales(model, 0.5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name in names:
        if ".encoder.layer." in name:
            i = int(name.split(".encoder.layer.")[1].split(".")[0])
            assert scale(name) == 0.5 ** (LAYERS - i), name
        elif ".embeddings." in name:
            assert scale(name) == 0.5 ** (LAYERS + 1), name
        else:
            assert "classifier" in name and scale(name) == 1.0, name
    b_ratio = lambda n: 16.0 if "lora_B" in n else 1.0  # noqa: E731 (LoRA+)
    optimizer = build_optimizer(model, config.LoopConfig(lr=1e-3), lambda n: b_ratio(n) * scale(n))
    rates = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    top_b = next(n for n in names if f"layer.{LAYERS - 1}." in n and "lora_B" in n)
    assert rates[id(dict(model.named_parameters())[top_b])] == 16.0 * 0.5
    assert len({round(r, 6) for r in rates.values()}) == 1 + LAYERS * 2 + 1  # head, each layer's A and B, embeddings


def test_a_patience_the_run_cannot_reach_is_refused(quick_overrides):
    cfg = config.load(None, [*quick_overrides, "method.name=lora", "train.epochs=3",
                             "train.early_stopping_patience=3"])
    with pytest.raises(PeftbenchError, match="'train.early_stopping_patience' must be < 3, the run's evaluations"):
        run(cfg)


def test_early_stopping_counts_evaluations_since_the_best():
    assert not tricks.should_stop(3, 0, 0)  # off
    assert not tricks.should_stop(2, 0, 2)
    assert tricks.should_stop(3, 0, 2)
    assert not tricks.should_stop(3, 1, 2)


@pytest.mark.parametrize("key, value, rule", [
    ("layer_decay", 0, "in (0, 1] (1: off)"), ("layer_decay", 1.5, "in (0, 1] (1: off)"),
    ("label_smoothing", 1, "in [0, 1)"), ("rdrop_alpha", -1, "a finite number >= 0"),
    ("adversarial", "fgsm", "one of none, fgm, pgd"), ("adversarial_epsilon", 0, "a finite number > 0"),
    ("adversarial_steps", 0, ">= 1"), ("ema_decay", 1, "in [0, 1) (0: off)"), ("swa_last", 1, "0 (off) or >= 2"),
    ("early_stopping_patience", -1, ">= 0 (0: off)")])
def test_a_bad_trick_setting_is_one_line_naming_its_key(key, value, rule):
    with pytest.raises(PeftbenchError, match=f"'train.{key}' must be {re.escape(rule)}, got"):
        config.load(None, [f"train.{key}={value}"])


@pytest.mark.parametrize("overrides, message", [
    (["train.distill.alpha=0.3"], "'train.distill.alpha' is set [(]0.3[)] but does nothing without "
                                  "train.distill.teacher"),
    (["train.adversarial_epsilon=0.3"], "'train.adversarial_epsilon' is set .* without train.adversarial=fgm or pgd"),
    (["train.adversarial=fgm", "train.adversarial_steps=2"],
     "'train.adversarial_steps' .* without train.adversarial=pgd"),
    (["method.name=adalora", "train.ema_decay=0.9"], "'train.ema_decay' and 'method.name=adalora' conflict: adalora "
                                                     "masks its trained tensors")])
def test_a_setting_that_would_change_nothing_or_break_the_average_is_refused(overrides, message):
    with pytest.raises(PeftbenchError, match=message):
        config.load(None, overrides)


def test_layer_decay_refuses_a_method_that_trains_nothing_inside_the_layers():
    from peft import PromptTuningConfig

    model = get_peft_model(tiny(), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    for p in model.base_model.classifier.parameters():
        p.requires_grad_(False)
    with pytest.raises(PeftbenchError, match="'train.layer_decay': none of the trained parameters lies in a layer"):
        tricks.layer_scales(model, 0.8)


def test_token_terms_skip_the_virtual_tokens_a_prompt_puts_first():
    """Prompt tuning's token logits hold its virtual tokens first: the terms use the labelled tokens' only."""
    from peftbench.tricks import distill, label_smoothing, rdrop

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[1, 0, -100], [2, 2, 1]])
    logits = torch.randn(2, 3 + 4, 3, generator=g)  # 4 virtual tokens, then 3 real ones
    assert torch.equal(label_smoothing.smoothing_term(logits, labels, 0.1),
                       label_smoothing.smoothing_term(logits[:, 4:], labels, 0.1))
    doubled = torch.cat([labels, labels])
    pair = torch.randn(4, 7, 3, generator=g)
    assert torch.equal(rdrop.symmetric_kl(pair, doubled), rdrop.symmetric_kl(pair[:, 4:], doubled))
    assert torch.equal(distill.soft_term(logits, logits.flip(0), labels, 2.0),
                       distill.soft_term(logits[:, 4:], logits.flip(0)[:, 4:], labels, 2.0))


def test_ema_and_swa_together_are_refused():
    with pytest.raises(PeftbenchError, match="'train.ema_decay' and 'train.swa_last' conflict"):
        config.load(None, ["train.ema_decay=0.9", "train.swa_last=2"])


def test_tricks_at_their_defaults_keep_run_ids():
    plain = config.load(None, ["method.name=lora"])
    smoothed = config.load(None, ["method.name=lora", "train.label_smoothing=0.1", "train.adversarial=fgm"])
    assert plain.run_id != smoothed.run_id
    body = plain.to_dict()
    for key in config.LATER_KEYS:  # a record written before the tricks existed keeps its id
        if key.startswith("train.") and key not in ("train.evaluate_test", "train.sharding"):
            body["train"].pop(key.split(".")[1], None)  # distill.*: the whole section
    assert "label_smoothing" not in body["train"] and "distill" not in body["train"]
    assert config.resolve(body).run_id == plain.run_id
    assert smoothed.changed_settings()["train"] == {"label_smoothing": 0.1, "adversarial": "fgm"}


def spy(monkeypatch, cls, hook: str) -> list[dict]:
    """The raw trained weights each time ``cls.hook`` runs (the first entry: the weights the average began at)."""
    seen = []
    original = getattr(cls, hook)

    def spied(self):
        if not seen:
            seen.append({n: v.clone() for n, v in self.average.items()})
        original(self)
        seen.append({n: p.detach().float().clone() for n, p in self.params.items()})

    monkeypatch.setattr(cls, hook, spied)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("averaging", ["ema", "swa"])
def test_averaged_weights_are_what_is_evaluated_and_saved(quick_overrides, monkeypatch, averaging):
    from safetensors.torch import load_file

    if averaging == "ema":
        extra, seen = ["train.ema_decay=0.7"], spy(monkeypatch, tricks.EMA, "on_optimizer_step")
    else:
        extra, seen = ["train.swa_last=2"], spy(monkeypatch, tricks.SnapshotMean, "on_eval")
    cfg = config.load(None, [*quick_overrides, "method.name=lora", "train.lr=2e-2", "train.epochs=3",
                             "task.max_train_samples=32", "train.batch_size=16", *extra])
    result = run(cfg)
    history = result.record["dev_history"]
    best = max(range(len(history)), key=lambda i: (history[i]["score"], -i))
    if averaging == "ema":  # one entry per optimizer step
        average = dict(seen[0])
        for n, raw in enumerate(seen[1:history[best]["step"] + 1], start=1):
            decay = min(0.7, (1 + n) / (10 + n))
            average = {k: decay * average[k] + (1 - decay) * raw[k] for k in average}
    else:  # one entry per evaluation
        last = seen[1:][max(0, best - 1):best + 1]
        average = {k: torch.stack([s[k] for s in last]).mean(0) for k in last[0]}
    assert len(history) == 3 and result.record["metrics"]["best_epoch"] == history[best]["epoch"]
    raw_end = seen[-1]
    trained = {n: p.detach().float() for n, p in result.model.named_parameters() if p.requires_grad}
    assert all(torch.allclose(trained[k], average[k], atol=1e-6) for k in trained)
    assert any(not torch.allclose(trained[k], raw_end[k], atol=1e-4) for k in trained)  # not the raw weights
    saved = load_file(f"{cfg.output_dir}/{CHECKPOINT_DIR}/adapter_model.safetensors")
    names = {k.replace(".modules_to_save.default", "").replace(".default", ""): k for k in trained}
    assert set(saved) <= set(names) and len(saved) >= 2
    assert all(torch.allclose(saved[k].float(), average[names[k]], atol=1e-6) for k in saved)
    assert result.record["settings"]["train"] == {"ema_decay": 0.7} if averaging == "ema" else {"swa_last": 2}


def test_early_stopping_ends_the_run_and_says_so(quick_overrides, monkeypatch):
    from peftbench.train import fine_tuning

    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])  # best at the second evaluation, then two without a better one
    real = fine_tuning.evaluate

    def scored(model, loader, accelerator, task, split):
        metrics, ids, preds = real(model, loader, accelerator, task, split)
        return ({**metrics, "score": next(scores)} if split == "dev" else metrics), ids, preds

    monkeypatch.setattr(fine_tuning, "evaluate", scored)
    cfg = config.load(None, [*quick_overrides, "method.name=lora", "train.epochs=6", "task.max_train_samples=32",
                             "train.batch_size=16", "train.early_stopping_patience=2", "train.save_checkpoint=false"])
    rec = run(cfg).record
    assert [h["score"] for h in rec["dev_history"]] == [0.5, 0.6, 0.55, 0.58]
    assert rec["metrics"]["stopped_by"] == "early_stopping" and rec["metrics"]["best_epoch"] == 2
    assert rec["dev_history"][-1]["step"] == 8 and rec["total_steps"] == 12


@pytest.mark.slow
def test_every_trick_at_once_trains_a_lora_above_chance(quick_overrides, monkeypatch):
    """They compose: a LoRA with layer decay, smoothing, R-Drop, PGD and EMA learns the synthetic task, and the
    row says which tricks it used."""
    from peftbench import leaderboard
    from peftbench.train import fine_tuning
    from peftbench.tricks import label_smoothing, rdrop

    calls = Counter()

    def counted(module, name):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    counted(label_smoothing, "smoothing_term")
    counted(rdrop, "symmetric_kl")
    losses = tricks.Adversary.losses

    def adversarial(self, *args):
        for loss in losses(self, *args):
            calls["adversarial"] += 1
            yield loss

    monkeypatch.setattr(tricks.Adversary, "losses", adversarial)
    groups = []
    build = fine_tuning.build_optimizer
    monkeypatch.setattr(fine_tuning, "build_optimizer",
                        lambda *a: groups.extend(build(*a).param_groups) or build(*a))
    tricks_on = ["train.layer_decay=0.9", "train.label_smoothing=0.1", "train.rdrop_alpha=1.0",
                 "train.adversarial=pgd", "train.adversarial_steps=2", "train.ema_decay=0.9"]
    cfg = config.load(None, [*quick_overrides, "method.name=lora", "train.lr=2e-2", "train.epochs=4",
                             "task.max_train_samples=160", *tricks_on])
    rec = run(cfg).record
    steps = rec["total_steps"]  # each step: one clean and two PGD passes, each smoothed and R-Dropped
    assert calls["smoothing_term"] == calls["symmetric_kl"] == 3 * steps and calls["adversarial"] == 2 * steps, calls
    assert sorted({round(g["lr_scale"], 6) for g in groups}) == [0.9 ** 2, 0.9, 1.0]  # 2 layers (LoRA), the head
    assert rec["metrics"]["accuracy"] > 0.25 + 0.2, rec["metrics"]
    assert json.loads(json.dumps(rec["settings"]["train"])) == {
        "layer_decay": 0.9, "label_smoothing": 0.1, "rdrop_alpha": 1.0, "adversarial": "pgd", "adversarial_steps": 2,
        "ema_decay": 0.9}
    (group,) = leaderboard.build(leaderboard.collect([cfg.output_dir])[0])
    (row,) = group.rows.values()
    assert all(part.split(".")[1] in row.label for part in tricks_on), row.label


def test_the_planner_refuses_tricks_it_does_not_model():
    from peftbench.plan import plan

    with pytest.raises(PeftbenchError, match="train.rdrop_alpha: peftbench plan does not model"):
        plan(config.load(None, ["train.rdrop_alpha=1"]), ["lora"], device="cpu")


def test_distillation_term_is_t_squared_kl_of_the_softened_teacher():
    from peftbench.tricks import distill

    g = torch.Generator().manual_seed(0)
    student, teacher, labels = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g), torch.tensor(
        [0, 1, 2, -100, 1])
    t = 2.0
    p, q = torch.softmax(teacher[[0, 1, 2, 4]] / t, -1), torch.softmax(student[[0, 1, 2, 4]] / t, -1)
    expected = t * t * (p * (p / q).log()).sum(-1).mean()
    assert torch.allclose(distill.soft_term(student, teacher, labels, t), expected, atol=1e-6)
    model, b = tiny().eval(), batch()
    teacher_model = tiny(seed=3)
    plain = tricks.plain_loss(model, b)
    assert torch.allclose(tricks.objective(0, 0, tricks.Teacher(teacher_model, t, 0.0))(model, b), plain)
    soft_only = tricks.objective(0, 0, tricks.Teacher(teacher_model, t, 1.0))(model, b)
    with torch.no_grad():
        reference = distill.soft_term(model(**b["inputs"]).logits, teacher_model(**b["inputs"]).logits, b["labels"], t)
    assert torch.allclose(soft_only, reference, atol=1e-6) and not torch.allclose(soft_only, plain)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A fully fine-tuned tiny teacher on the synthetic task."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    return run(config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48",
                                  "train.measure_inference=false", "method.name=full", "train.lr=5e-4",
                                  "train.epochs=4", f"output_dir={out}"]))


@pytest.mark.slow
def test_a_lora_learns_from_a_teachers_soft_labels(teacher, quick_overrides, monkeypatch):
    """Nearly all of the student's loss is the teacher's softened predictions; it learns the task, and its
    record names the teacher."""
    assert teacher.record["metrics"]["accuracy"] > 0.6
    ckpt = teacher.record["checkpoint"]
    cfg = config.load(None, [*quick_overrides, "method.name=lora", "train.lr=5e-3", "train.epochs=4",
                             f"train.distill.teacher={ckpt}", "train.distill.alpha=0.9"])
    soft = []
    original = tricks.distill.soft_term
    monkeypatch.setattr(tricks.distill, "soft_term", lambda *a: soft.append(1) or original(*a))
    rec = run(cfg).record
    assert len(soft) == rec["total_steps"]  # the teacher's term is in every step's loss
    assert rec["metrics"]["accuracy"] > 0.25 + 0.25, rec["metrics"]
    assert rec["teacher"]["run_id"] == teacher.record["run_id"] and rec["teacher"]["method"] == "full"
    assert rec["settings"]["train"] == {"distill.teacher": ckpt, "distill.alpha": 0.9}


@pytest.mark.slow
def test_a_teacher_of_another_task_or_tokenizer_is_refused(teacher, quick_overrides):
    ckpt = teacher.record["checkpoint"]
    few = config.load(None, [*quick_overrides, "method.name=lora", "task.max_train_samples=8",
                             f"train.distill.teacher={ckpt}"])  # the tiny backbone's vocabulary: 8 texts' characters
    with pytest.raises(PeftbenchError, match="has another tokenizer .* distil into a backbone that shares"):
        run(few)
    other = config.load(None, [*quick_overrides, "method.name=lora", "task.name=synthetic_ner",
                               f"train.distill.teacher={ckpt}"])
    with pytest.raises(PeftbenchError, match="was trained on task 'synthetic' with labels"):
        run(other)


def test_layer_decay_finds_a_decoders_layers_and_embeddings():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=2, num_attention_heads=2,
                                                       num_key_value_heads=1, num_labels=3, pad_token_id=0))
    scale = tricks.layer_scales(model, 0.5)
    got = {name: scale(name) for name, _ in model.named_parameters()}
    assert got["model.embed_tokens.weight"] == 0.5 ** 3
    assert got["model.layers.0.self_attn.q_proj.weight"] == 0.25 and got["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert got["model.norm.weight"] == got["score.weight"] == 1.0
