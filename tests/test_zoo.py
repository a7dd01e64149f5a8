"""Checkpoints shaped like hub releases (tests/zoo.py): every method trains two steps on each, reloads in a
new process to the same logits and the record's test score, and gives the same logits whatever the padding."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import logits_here, logits_in_new_process

import peftbench
from peftbench import config, models
from peftbench.errors import PeftbenchError
from peftbench.methods import method_names
from peftbench.tasks.synthetic import generate_splits
from peftbench.train import run

ZOO_ARGS = ["train.max_steps=2", "train.lr=1e-3", "task.max_length=48", "task.max_train_samples=64",
            "train.measure_inference=false"]
TEXTS = ["股钱债涨跌", "星影歌剧综艺的", "的"]  # three lengths: every batch is padded


def zoo_config(path, method, out_dir, *extra):
    return config.load(None, [f"model.name_or_path={path}", f"method.name={method}", *ZOO_ARGS,
                              f"output_dir={out_dir}", *extra])


@pytest.fixture(scope="module")
def zoo_runs(zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_runs")
    return {(name, method): run(zoo_config(path, method, root / name / method))
            for name, path in zoo.items() for method in method_names(presets=False)}


def test_every_method_trains_in_fp32_on_every_checkpoint(zoo_runs):
    for (name, method), result in zoo_runs.items():
        record = result.record
        assert record["status"] == "success" and record["total_steps"] == 2, (name, method)
        assert record["precision"]["stored_dtype"] == ("bfloat16" if name == "qwen2-bf16" else "float32")
        assert record["precision"]["loaded_dtype"] == "float32"
        trained = [p for p in result.model.parameters() if p.requires_grad]
        assert trained and all(p.dtype == torch.float32 for p in trained), (name, method)


def test_reloads_in_a_new_process_to_the_same_logits_and_test_score(zoo_runs, tmp_path):
    test = generate_splits()["test"]
    texts = [r["sentence"] for r in test]
    reloaded = logits_in_new_process({f"{n}/{m}": r.record["checkpoint"] for (n, m), r in zoo_runs.items()},
                                     texts, tmp_path)
    for (name, method), result in zoo_runs.items():
        key = f"{name}/{method}"
        torch.testing.assert_close(reloaded[key], logits_here(result, texts), atol=1e-5, rtol=0, msg=key)
        labels = json.loads((Path(result.record["checkpoint"]) / "peftbench.json").read_text())["labels"]
        predicted = [labels[i] for i in reloaded[key].argmax(-1).tolist()]
        accuracy = sum(p == str(r["label"]) for p, r in zip(predicted, test)) / len(test)
        assert accuracy == pytest.approx(result.record["metrics"]["test_accuracy"], abs=1e-12), key


def test_either_padding_side_gives_the_logits_of_one_text_at_a_time(zoo_runs):
    """Decoders pad on either side (positions counted from the mask); BERT refuses a left-padded batch."""
    for (name, method), result in zoo_runs.items():
        model, tokenizer = result.model.eval(), result.tokenizer
        with torch.no_grad():
            alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
            for side in ("right", "left"):
                tokenizer.padding_side = side
                batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
                tokenizer.padding_side = "right"
                if side == "left" and not name.startswith("qwen"):
                    with pytest.raises(PeftbenchError, match="left-padded batch"):
                        model(**batch)
                    continue
                torch.testing.assert_close(model(**batch).logits, alone, atol=1e-5, rtol=0,
                                           msg=f"{name}/{method} padded on the {side}")


def test_a_moved_base_loads_and_a_different_base_is_refused(zoo, zoo_runs, tmp_path):
    ckpt = zoo_runs["bert-no-pooler", "lora"].record["checkpoint"]
    meta = json.loads((Path(ckpt) / "peftbench.json").read_text())
    assert meta["base"]["source"] == str(zoo["bert-no-pooler"].resolve())  # absolute: usable from any folder
    assert meta["base"]["new_weights"] == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias",
                                           "classifier.weight"]
    moved = shutil.copytree(zoo["bert-no-pooler"], tmp_path / "moved")
    model, tokenizer, _ = peftbench.load(ckpt, base=str(moved))
    with torch.no_grad():
        here = logits_here(zoo_runs["bert-no-pooler", "lora"], TEXTS)
        torch.testing.assert_close(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, here,
                                   atol=1e-6, rtol=0)
    with pytest.raises(PeftbenchError, match="not the model this checkpoint was trained on"):
        peftbench.load(ckpt, base=str(zoo["bert"]))


def test_pad_ids_of_config_and_tokenizer_must_agree(zoo, tmp_path):
    broken = shutil.copytree(zoo["qwen2-bf16"], tmp_path / "qwen")
    saved = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**saved, "pad_token_id": 5}))
    with pytest.raises(PeftbenchError, match=r"config.json: field 'pad_token_id' is 5 but the tokenizer pads with "
                                             r"id 0"):
        run(zoo_config(broken, "lora", tmp_path / "run"))


def test_a_tokenizer_without_pad_token_pads_with_its_end_token(zoo, tmp_path):
    no_pad = shutil.copytree(zoo["qwen2-bf16"], tmp_path / "qwen")
    settings = json.loads((no_pad / "tokenizer_config.json").read_text())
    settings.pop("pad_token")
    (no_pad / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = models.load_tokenizer(config.ModelConfig(name_or_path=str(no_pad)), [])
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


PEFT_FORMAT = ("lora", "adalora", "ia3", "prompt")  # methods saved as PEFT adapters; full saves a plain model


def test_the_model_card_loads_with_transformers_and_peft_alone(zoo_runs):
    """The card's snippet (no peftbench) rebuilds the model: every weight, the pooler a base lacked included,
    label names in id2label; one text at a time, so that no padding convention enters."""
    for (name, method), result in zoo_runs.items():
        if method not in (*PEFT_FORMAT, "full"):
            continue
        card = (Path(result.record["checkpoint"]) / "README.md").read_text(encoding="utf-8")
        assert f"# synthetic · {method}" in card and result.record["run_id"] in card
        snippet = card.split("## Load without peftbench")[1].split("```python")[1].split("```")[0]
        scope = {}
        exec(snippet, scope)  # noqa: S102  (the card's own code)
        model, tokenizer = scope["model"], scope["tokenizer"]
        assert model.config.id2label == {0: "体育", 1: "财经", 2: "科技", 3: "娱乐"}
        with torch.no_grad():
            plain = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in TEXTS])
        trained = torch.cat([logits_here(result, [t]) for t in TEXTS])
        torch.testing.assert_close(plain, trained, atol=1e-5, rtol=0, msg=f"{name}/{method}")


def test_a_decoder_exports_to_onnx_with_its_padding_rules(zoo_runs, tmp_path):
    """Qwen2 with prompt tuning: positions from the mask and each row's padding moved in front, in the graph."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from peftbench.export import REPORT_FILE, export

    result = zoo_runs["qwen2-bf16", "prompt"]
    out = export(result.record["checkpoint"], tmp_path / "onnx", "onnx")
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["inputs"] == ["input_ids", "attention_mask"] and report["check"]["max_abs_logit_diff"] <= 1e-4
    accuracy = result.record["metrics"]["test_accuracy"]
    assert report["scores"]["onnx"] == pytest.approx(accuracy, abs=1.5 / 300)  # one near tie may flip
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = result.tokenizer(TEXTS, padding=True, return_tensors="np")
    got = session.run(None, {name: inputs[name] for name in report["inputs"]})[0]
    torch.testing.assert_close(torch.from_numpy(got), logits_here(result, TEXTS), atol=1e-4, rtol=0)
