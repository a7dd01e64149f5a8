"""Every registered method, on the tiny backbone and the synthetic task."""

import json
import stat
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import CHANCE, VARIANTS, logits_here, logits_in_new_process, tnews_folder, variant_config
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

import peftbench
from peftbench import checkpoint, config, models
from peftbench.methods import RunContext, get_method, method_names
from peftbench.tasks import load_task
from peftbench.train import run


def test_every_method_is_covered():
    assert {v.split("-")[0] for v in VARIANTS} == set(method_names(presets=False))


@pytest.fixture
def trained(trained_variants):
    return trained_variants


@pytest.mark.parametrize("variant", VARIANTS)
def test_trains_above_chance(trained, variant):
    m = trained[variant].record["metrics"]
    assert m["accuracy"] > CHANCE + 0.2 and m["test_accuracy"] > CHANCE + 0.2, m


def initial_model(cfg, tokenizer):
    """The model exactly as ``run`` builds it before training (same seed, same order)."""
    set_seed(cfg.train.seed)
    model = models.load_model(cfg.model, ["0", "1", "2", "3"], tokenizer)[0]
    method = get_method(cfg.method.name)(cfg.method)
    model = method.apply(model, RunContext(total_steps=1000, num_labels=4))
    return model, method


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_declared_parameters_change(trained, variant):
    result = trained[variant]
    cfg = config.resolve(result.record["config"])
    before, method = initial_model(cfg, result.tokenizer)
    after = dict(result.model.named_parameters())
    changed = 0
    for name, p0 in before.named_parameters():
        if method.is_trainable(name):
            changed += not torch.equal(p0, after[name])
        else:
            assert torch.equal(p0, after[name]), f"frozen parameter {name} changed"
    assert changed >= 2


def tiny_dims(result):
    c = result.model.config if not hasattr(result.model, "get_base_model") else result.model.get_base_model().config
    return c.hidden_size, c.num_hidden_layers, c.intermediate_size, 4


def expected_trainable(variant, result):
    """Each method's parameter-count formula (docs/methods/<name>.md) on the tiny backbone."""
    d, L, ff, k = tiny_dims(result)
    head = d * k + k
    if variant == "full":
        return result.record["params"]["total"]
    if variant in ("lora", "lora-rslora"):
        return L * 2 * 8 * (d + d) + head
    if variant == "lora-dora":
        return L * 2 * (8 * (d + d) + d) + head
    if variant == "adalora":
        return L * 2 * (12 * (d + d) + 12) + head
    if variant.startswith("adapter"):
        m, per_layer = d // 16, 2 if variant == "adapter" else 1
        return L * per_layer * (2 * d * m + d + m) + head
    if variant == "prefix":
        n, h = 20, 512
        return n * d + d * h + h + h * (L * 2 * d) + L * 2 * d + head
    if variant == "prefix-no-mlp":
        return L * 2 * 20 * d + head
    if variant == "prompt":
        return 20 * d + head
    if variant == "ia3":
        return L * (d + d + d + ff) + head  # key, value, attention output (input side), feed-forward output input
    if variant == "peft":  # LoHa on query and value: 2 r (d_in + d_out) per module
        return L * 2 * 2 * 8 * (d + d) + head
    if variant == "bitfit":
        per_layer = 3 * d + d + d + ff + d + d  # q,k,v; attention out; its norm; intermediate; output; its norm
        return L * per_layer + d + d + head  # + embedding norm, pooler
    raise AssertionError(variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_count_matches_formula(trained, variant):
    assert trained[variant].record["params"]["trainable"] == expected_trainable(variant, trained[variant])


@pytest.mark.slow  # a new process
def test_reload_in_a_new_process_gives_identical_logits(trained, tmp_path):
    texts = ["股钱债涨跌", "星影歌剧综艺的", "今天芯片与网络"]
    reloaded = logits_in_new_process({v: r.record["checkpoint"] for v, r in trained.items()}, texts, tmp_path)
    for variant, result in trained.items():
        expected = logits_here(result, texts)
        if variant == "adalora":  # saved with the pruned ranks removed: equal maths, other rounding
            torch.testing.assert_close(reloaded[variant], expected, atol=1e-5, rtol=0)
        else:
            assert torch.equal(reloaded[variant], expected), variant


@pytest.mark.parametrize("variant", ["lora", "lora-rslora", "lora-dora", "adalora", "ia3", "prompt", "peft"])
def test_peft_methods_save_standard_peft_adapters(trained, variant):
    result = trained[variant]
    ckpt = result.record["checkpoint"]
    base = AutoModelForSequenceClassification.from_pretrained(f"{ckpt}/base")
    model = PeftModel.from_pretrained(base, ckpt).eval()
    enc = result.tokenizer(["股钱债涨跌"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, result.model.eval()(**enc).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["adapter", "prefix", "bitfit"])
def test_own_methods_save_only_what_they_trained(trained, variant):
    from safetensors.torch import load_file

    result = trained[variant]
    saved = load_file(f"{result.record['checkpoint']}/trainable.safetensors")
    n_saved = sum(t.numel() for t in saved.values())
    if variant == "prefix":  # the MLP is folded away: only the prefixes and the head
        assert n_saved == expected_trainable("prefix-no-mlp", result)
        assert n_saved < result.record["params"]["trainable"]
    else:
        assert n_saved == result.record["params"]["trainable"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapter_bytes_are_the_checkpoint_tensors(trained, variant):
    """``adapter_bytes`` is what the method's weight files hold (a run without a checkpoint records the same)."""
    from safetensors.torch import load_file

    folder = Path(trained[variant].record["checkpoint"])
    files = [f for f in folder.glob("*.safetensors") if f.name != checkpoint.NEW_WEIGHTS_FILE]
    assert files
    held = sum(t.numel() * t.element_size() for f in files for t in load_file(str(f)).values())
    assert trained[variant].record["params"]["adapter_bytes"] == held


@pytest.mark.parametrize("variant", ["lora", "lora-rslora", "adalora", "ia3", "peft"])
def test_merged_model_equals_unmerged(trained, variant):
    ckpt = trained[variant].record["checkpoint"]
    unmerged, tok, _ = peftbench.load(ckpt)
    merged, _, _ = peftbench.load(ckpt, merge=True)
    assert not isinstance(merged, PeftModel)
    enc = tok(["股钱债涨跌", "星影歌剧综艺的芯片"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, unmerged(**enc).logits, atol=1e-5, rtol=0)


def test_every_record_names_the_backbone_and_data_it_read(trained):
    """One tiny architecture and one generated task: every variant's record holds the same fingerprints (the
    method, its seed and its head change none), taken when the run loaded them."""
    from peftbench import checkpoint, models

    records = [run.record for run in trained.values()]
    expected = checkpoint.backbone_fingerprint("tiny", models.random_init_architecture("tiny"), True)
    assert {r["backbone"]["fingerprint"] for r in records} == {expected}
    assert all(r["data"]["task_version"] == 1 for r in records)
    assert len({json.dumps(r["data"]["fingerprints"], sort_keys=True) for r in records}) == 1
    assert set(records[0]["data"]["fingerprints"]) == {"train", "dev", "test"}
    for r in records:  # each example's part of the score, for the leaderboard's paired bootstrap
        for split, key in (("dev", "accuracy"), ("test", "test_accuracy")):
            part = r["per_example"][split]
            assert part["n"] == len(part["values"]) == 300
            assert part["values"].count("1") / 300 == pytest.approx(r["metrics"][key], abs=1e-12)
    assert len({r["per_example"]["test"]["ids_sha256"] for r in records}) == 1


def test_merge_refused_where_nothing_merges(trained):
    with pytest.raises(peftbench.errors.PeftbenchError, match="no weights to merge"):
        peftbench.load(trained["adapter"].record["checkpoint"], merge=True)


def test_adalora_final_ranks_respect_the_budget(trained):
    summary = trained["adalora"].record["method_summary"]
    assert summary["target_total_rank"] == 2 * 2 * 8 and summary["init_total_rank"] == 2 * 2 * 12
    assert len(summary["final_ranks"]) == 4
    assert 0 < summary["final_total_rank"] <= summary["target_total_rank"]


def test_adalora_updates_once_per_optimizer_step(tmp_path, monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    calls = []
    original = AdaLoraModel.update_and_allocate

    def counting(self, global_step):
        assert all(p.grad is not None for n, p in self.named_parameters() if "lora_E" in n)  # before zero_grad
        calls.append(global_step)
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", counting)
    cfg = variant_config("adalora", tmp_path, "train.max_steps=12", "train.batch_size=8", "train.grad_accum_steps=4",
                         "train.save_checkpoint=false", "train.measure_inference=false")
    result = run(cfg)
    assert result.record["total_steps"] == 12
    assert calls == list(range(1, 13))  # 48 micro-batches, 12 updates


def test_adalora_orthogonality_regulariser_is_in_the_loss():
    model_cfg = config.ModelConfig()
    tok = models.char_tokenizer(["甲乙丙丁"])
    enc = tok(["甲乙", "丙丁甲"], padding=True, return_tensors="pt")
    losses = []
    for weight in (0.0, 0.5):
        set_seed(0)
        model = models.load_model(model_cfg, ["0", "1"], tok)[0]
        cfg = get_method("adalora").Config(orth_reg_weight=weight)
        model = get_method("adalora")(cfg).apply(model, RunContext(total_steps=100, num_labels=2)).train()
        torch.manual_seed(0)
        losses.append(model(**enc, labels=torch.tensor([0, 1])).loss.item())
    assert losses[1] > losses[0]


def test_predict_writes_clue_submission_and_matches_the_record(trained, tmp_path):
    from peftbench.cli import main
    from peftbench.tasks.synthetic import generate_splits

    result = trained["adapter"]
    ckpt = result.record["checkpoint"]
    assert main(["predict", ckpt, "--split", "test", "--format", "clue", "--out", f"{tmp_path}/submit/"]) == 0
    lines = (tmp_path / "submit" / "synthetic_predict.json").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    gold = generate_splits()["test"]
    assert [r["id"] for r in rows] == [g["id"] for g in gold]  # file order, ids as in the data
    assert all(set(r) == {"id", "label"} and r["label"] in {"0", "1", "2", "3"} for r in rows)
    accuracy = sum(r["label"] == str(g["label"]) for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(result.record["metrics"]["test_accuracy"])
    assert main(["predict", ckpt, "--split", "dev", "--out", f"{tmp_path}/dev.jsonl"]) == 0
    first = json.loads((tmp_path / "dev.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"id", "label", "label_name", "score"} and 0 < first["score"] <= 1


@pytest.mark.parametrize("method", method_names(presets=False))
def test_gradient_checkpointing_trains_identically(method, tmp_path):
    """Recomputing activations (with the same dropout masks) saves memory and leaves training unchanged."""
    results = [run(variant_config(method, tmp_path / gc, "train.max_steps=6", "train.save_checkpoint=false",
                                  "train.measure_inference=false", "train.evaluate_test=false",
                                  f"train.gradient_checkpointing={gc}")) for gc in ("false", "true")]
    plain, checkpointed = ({n: p for n, p in r.model.named_parameters() if p.requires_grad} for r in results)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert results[1].record["metrics"]["accuracy"] == results[0].record["metrics"]["accuracy"]


PLAIN = ["full", "lora", "lora-rslora", "lora-dora", "adalora", "ia3", "bitfit", "peft"]
EXPORT_CHECK = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out[name] = model(**tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")).logits
assert "peftbench" not in sys.modules
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow  # export, and a new process
def test_export_writes_folders_that_transformers_alone_loads(trained, tmp_path):
    import subprocess
    import sys

    from peftbench.errors import PeftbenchError
    from peftbench.export import export

    texts = ["股钱债涨跌", "星影歌剧综艺的", "的"]
    folders = {v: str(export(trained[v].record["checkpoint"], tmp_path / v)) for v in PLAIN}
    from peftbench.records import FILE_MODE

    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()} == {FILE_MODE}  # weights too
    proc = subprocess.run([sys.executable, "-c", EXPORT_CHECK, json.dumps(folders), json.dumps(texts),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = torch.load(tmp_path / "logits.pt")
    for variant in PLAIN:
        reloaded, _, meta = peftbench.load(trained[variant].record["checkpoint"])
        exported = json.loads((tmp_path / variant / "config.json").read_text(encoding="utf-8"))["id2label"]
        assert exported == {str(i): name for i, name in enumerate(meta["model_labels"])}, variant
        assert meta["model_labels"] == meta["label_names"]  # distinct names: export names labels as predict does
        with torch.no_grad():
            expected = reloaded(**trained[variant].tokenizer(texts, padding=True, return_tensors="pt")).logits
        torch.testing.assert_close(plain[variant], expected, atol=1e-4, rtol=0, msg=variant)
    for variant in ("adapter", "prefix", "prompt"):
        with pytest.raises(PeftbenchError, match=f"method '{variant}' adds modules transformers does not have"):
            export(trained[variant].record["checkpoint"], tmp_path / variant)


ONNX = ["full", "lora", "adalora", "adapter", "prefix", "prompt", "ia3", "bitfit", "peft"]  # one variant per method


@pytest.mark.slow
def test_onnx_export_of_every_method_runs_in_onnxruntime_as_peftbench_load(trained, tmp_path, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    from peftbench.export import REPORT_FILE, export

    assert {v.split("-")[0] for v in ONNX} == set(method_names(presets=False))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # onnxruntime's tools write temporary files: never where the user stands
    texts = ["股", "星影歌剧综艺的股钱债涨跌星影歌剧", "的的"]  # other batch sizes and lengths than the traced ones
    for variant in ONNX:
        ckpt = trained[variant].record["checkpoint"]
        out = export(ckpt, tmp_path / variant, "onnx", quantize="int8" if variant == "lora" else None)
        report = json.loads((out / REPORT_FILE).read_text())
        check, scores = report["check"], report["scores"]
        assert check["split"] == "test" and check["records"] == 300 and check["max_abs_logit_diff"] <= 1e-4
        assert scores["onnx"] == pytest.approx(scores["peftbench"], abs=1.5 / 300), variant  # one near tie may flip
        assert scores["peftbench"] == pytest.approx(trained[variant].record["metrics"]["test_accuracy"], abs=1e-9)
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        reloaded, tokenizer, _ = peftbench.load(ckpt)
        for batch in (texts[:1], texts):
            inputs = tokenizer(batch, padding=True, return_tensors="np")
            got = session.run(None, {name: inputs[name] for name in report["inputs"]})[0]
            with torch.no_grad():
                expected = reloaded(**tokenizer(batch, padding=True, return_tensors="pt")).logits
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0, msg=variant)
    int8 = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())["scores"]
    assert (tmp_path / "lora" / "model.int8.onnx").stat().st_size < (tmp_path / "lora" / "model.onnx").stat().st_size
    assert int8["int8_drop"] == pytest.approx(int8["peftbench"] - int8["onnx_int8"])
    assert int8["onnx_int8"] > CHANCE + 0.2, int8
    assert list(work.iterdir()) == []


MERGES = {"lora", "lora-rslora", "lora-dora", "adalora", "ia3", "peft"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_records_hold_the_inference_cost(trained, variant):
    record = trained[variant].record
    cost = record["inference"]
    assert cost["split"] == "test"
    assert set(cost) == ({"split", "as_trained", "flops_per_sample", "base_flops_per_sample", "flops_length"}
                         | ({"merged"} if variant in MERGES else set()))
    test_texts = list(load_task(config.resolve(record["config"]).task).splits["test"]["text_a"])
    test_lengths = [len(ids) for ids in trained[variant].tokenizer(test_texts, truncation=True, max_length=48)[
        "input_ids"]]
    for measured in (cost[k] for k in ("as_trained", "merged") if k in cost):
        assert measured["latency_calls"] >= 50 and 0 < measured["latency_ms_p50"] <= measured["latency_ms_p95"]
        assert measured["latency_tokens"] == sorted(test_lengths)[len(test_lengths) // 2]
        assert measured["batch_size"] == 128 and measured["samples_per_s"] > 0
        # real tokens only: the ratio is the split's mean length, not the padded width
        assert measured["tokens_per_s"] / measured["samples_per_s"] == pytest.approx(
            sum(test_lengths) / len(test_lengths))
    # FLOPs of one median-length sequence as served (merged where it merges) and of the plain architecture
    assert cost["flops_length"] == sorted(test_lengths)[len(test_lengths) // 2]
    served, base = cost["flops_per_sample"], cost["base_flops_per_sample"]
    hidden = trained[variant].model.config.hidden_size
    layers = trained[variant].model.config.num_hidden_layers
    if variant in MERGES or variant in ("full", "bitfit"):
        assert served == base > 0  # nothing added at inference
    elif variant.startswith("adapter"):  # two matmuls d x m per adapter and token
        adapters = layers * (1 if variant == "adapter-pfeiffer" else 2)
        assert served - base == adapters * 4 * cost["flops_length"] * hidden * (hidden // 16)
    else:  # virtual tokens: prompt tokens run through every layer; prefixes lengthen every attention
        assert served > base


def test_records_hold_the_scores_of_guessing(trained):
    record = trained["lora"].record
    splits = load_task(config.resolve(record["config"]).task).splits
    for split in ("dev", "test"):
        labels = list(splits[split]["label"])
        majority = max(labels.count(k) for k in range(4)) / len(labels)
        assert record["baselines"][split] == {"chance": CHANCE, "majority": majority}
        assert majority < record["metrics"]["test_accuracy"]  # the trained model beats both


@pytest.mark.parametrize("variant", ["full", "lora", "adapter"])
def test_the_model_card_holds_the_records_scores_as_a_model_index(trained, variant):
    """The hub's own card parser reads every dev and test metric of the record back from the front matter."""
    from huggingface_hub import ModelCard

    record = trained[variant].record
    data = ModelCard.load(Path(record["checkpoint"]) / "README.md").data
    assert data.model_name == f"synthetic-{variant}-{record['run_id']}"
    assert data.library_name == ("peft" if variant == "lora" else "transformers") and "peftbench" in data.tags
    assert record["data"]["hub"] is None  # generated, not read from the hub: the dataset is named by the task
    m = record["metrics"]
    assert {(e.dataset_split, e.metric_type, e.metric_config): e.metric_value for e in data.eval_results} == {
        ("validation", "accuracy", None): m["accuracy"], ("validation", "f1", "macro"): m["macro_f1"],
        ("test", "accuracy", None): m["test_accuracy"], ("test", "f1", "macro"): m["test_macro_f1"]}
    assert {(e.task_type, e.dataset_type, e.dataset_name, e.dataset_config) for e in data.eval_results} == {
        ("text-classification", "synthetic", "synthetic", None)}


def test_a_hub_task_names_its_dataset_in_the_model_index():
    from peftbench.model_index import eval_results, model_index
    from peftbench.tasks import get_spec

    hub = get_spec(config.TaskConfig(name="tnews")).hub
    results = eval_results("tnews", hub, "classification", {"accuracy": 0.5, "macro_f1": 0.25, "n_eval": 10})
    assert [(e.dataset_type, e.dataset_config, e.dataset_split, e.metric_type, e.metric_value) for e in results] == [
        ("clue/clue", "tnews", "validation", "accuracy", 0.5), ("clue/clue", "tnews", "validation", "f1", 0.25)]
    index = model_index([("a", results), ("b", []), ("c", results[:1])])
    assert [entry["name"] for entry in index] == ["a", "c"]
    assert index[0]["results"][0]["dataset"] == {"name": "tnews", "type": "clue/clue", "config": "tnews",
                                                 "split": "validation"}


def test_the_accuracy_evaluate_module_scores_predictions_as_the_run_did(trained, tmp_path):
    """``peftbench predict`` + the accuracy_macro_f1 module: exactly the record's test scores."""
    evaluate = pytest.importorskip("evaluate")
    from peftbench.cli import main
    from peftbench.evaluate_modules import module_path
    from peftbench.tasks.synthetic import generate_splits

    record = trained["lora"].record
    m, gold = record["metrics"], generate_splits()["test"]
    labels = json.loads((Path(record["checkpoint"]) / "peftbench.json").read_text(encoding="utf-8"))["labels"]
    assert main(["predict", record["checkpoint"], "--split", "test", "--out", f"{tmp_path}/test.jsonl"]) == 0
    predicted = [labels.index(json.loads(line)["label"]) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    references = [labels.index(str(g["label"])) for g in gold]
    assert evaluate.load(module_path("accuracy_macro_f1")).compute(predictions=predicted, references=references) == {
        "accuracy": m["test_accuracy"], "macro_f1": m["test_macro_f1"], "n_eval": 300}


@pytest.mark.slow
def test_evaluates_evaluator_scores_an_exported_model_on_a_clue_split_as_the_run_did(tmp_path):
    """TNEWS in CLUE's layout: a LoRA run, its export (a transformers folder), and evaluate's text-classification
    evaluator (a transformers pipeline) with the accuracy_macro_f1 module on the dev split: the record's scores."""
    evaluate = pytest.importorskip("evaluate")
    from datasets import Dataset

    from peftbench.evaluate_modules import module_path
    from peftbench.export import export

    data = tnews_folder(tmp_path / "tnews")
    record = run(config.load(None, ["task.name=tnews", f"task.data_dir={data}", "method.name=lora", "train.lr=5e-3",
                                    "train.epochs=3", "train.batch_size=16", "train.measure_inference=false",
                                    f"output_dir={tmp_path / 'run'}"])).record
    labels = json.loads((Path(record["checkpoint"]) / "peftbench.json").read_text(encoding="utf-8"))["labels"]
    folder = export(record["checkpoint"], tmp_path / "hf", "hf")
    names = AutoModelForSequenceClassification.from_pretrained(str(folder)).config.id2label  # 体育, not 103
    dev = [json.loads(line) for line in (data / "dev.json").read_text(encoding="utf-8").splitlines()]
    scores = evaluate.evaluator("text-classification").compute(
        model_or_pipeline=str(folder), metric=evaluate.load(module_path("accuracy_macro_f1")),
        data=Dataset.from_list([{"sentence": r["sentence"], "label": labels.index(r["label"])} for r in dev]),
        input_column="sentence", label_column="label", label_mapping={name: i for i, name in names.items()})
    m = record["metrics"]
    assert m["accuracy"] > 0.5 and m["n_eval"] == len(dev) == 90  # 15 classes: chance 1/15
    assert scores["accuracy"] == pytest.approx(m["accuracy"], abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(m["macro_f1"], abs=1e-12)
