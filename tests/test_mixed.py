"""One forward pass for a batch that mixes adapters of every method on one shared base (peftbench.mixed)."""

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from peftbench import config
from peftbench.data import Collator
from peftbench.inference import load, load_base
from peftbench.mixed import NotShareable, SharedBase
from peftbench.tasks.kinds import KINDS

SHAREABLE = ["lora", "lora-rslora", "adalora", "adapter", "adapter-pfeiffer", "prefix", "prefix-no-mlp", "prompt",
             "ia3", "bitfit"]
OWN_MODEL = {"full": "changes the base's", "lora-dora": "DoRA", "peft": "a PEFT loha layer"}
TEXTS = ["股市今天大涨，银行板块领涨", "这部电影", "球队在决赛中以三比一获胜，新款手机发布", "天气",
         "歌手宣布举办巡回演唱会", "基金经理看好下半年行情，综艺节目收视率创新高"]


def alone(model, tokenizer, meta) -> tuple[list[dict], torch.Tensor]:
    """The texts encoded for one checkpoint, and its logits for them as one batch run through its own model."""
    examples = KINDS[meta["kind"]].encode_texts(tokenizer, TEXTS, None, meta["max_length"])
    batch = Collator(tokenizer.pad_token_id)([{**e, "id": i} for i, e in enumerate(examples)])
    with torch.inference_mode():
        logits = model(**batch["inputs"]).logits.float()
    return examples, logits[:, -batch["inputs"]["input_ids"].shape[1]:] if logits.dim() == 3 else logits


def mixed_rows(shared: SharedBase, served: dict, names: list[str], rows: int, seed: int = 0) -> dict[str, float]:
    """``rows`` rows of the adapters (each at least once when there are as many rows) and random texts in one
    batch: the largest gap per adapter to its logits alone."""
    rng = random.Random(seed)
    picks = [(names[j % len(names)], rng.randrange(len(TEXTS))) for j in range(rows)]  # every adapter, shuffled
    rng.shuffle(picks)
    collate = Collator(served[names[0]]["tokenizer"].pad_token_id)
    width = max(len(served[n]["examples"][i]["input_ids"]) for n, i in picks)
    rows = [collate([{**served[n]["examples"][i], "id": 0}], width)["inputs"] for n, i in picks]  # other tasks:
    out = shared.forward({k: torch.cat([r[k] for r in rows]) for k in rows[0]}, [n for n, _ in picks])  # apart
    gaps: dict[str, float] = {}
    for (name, i), logits in zip(picks, out, strict=True):
        want = served[name]["logits"][i]
        if want.dim() == 2:  # per token: the text's own tokens (padding differs between the batches)
            length = len(served[name]["examples"][i]["input_ids"])
            want, logits = want[:length], logits[:length]
        gaps[name] = max(gaps.get(name, 0.0), (want - logits).abs().max().item())
    return gaps


def serve_all(ckpts: dict[str, Path]) -> tuple[SharedBase, dict, dict[str, str]]:
    """A shared base for the checkpoints (all of one base), each added; the refused ones with their reasons."""
    served, refused = {}, {}
    first = next(iter(ckpts.values()))
    _, tokenizer, meta = load(first)
    shared = SharedBase(load_base(first, meta, tokenizer.pad_token_id).eval())
    for name, ckpt in ckpts.items():
        model, tokenizer, meta = load(ckpt)
        examples, logits = alone(model, tokenizer, meta)
        try:
            shared.add(name, model)
        except NotShareable as exc:
            refused[name] = str(exc)
            continue
        served[name] = {"tokenizer": tokenizer, "examples": examples, "logits": logits}
    return shared, served, refused


def test_every_method_mixed_in_one_pass_equals_it_served_alone(trained_variants):
    shared, served, refused = serve_all({v: Path(trained_variants[v].record["checkpoint"])
                                         for v in [*SHAREABLE, *OWN_MODEL]})
    assert set(served) == set(SHAREABLE)
    assert {n: OWN_MODEL[n] in reason for n, reason in refused.items()} == {n: True for n in OWN_MODEL}, refused
    gaps = mixed_rows(shared, served, SHAREABLE, rows=48)
    assert set(gaps) == set(SHAREABLE)  # every method has rows in the batch
    assert max(gaps.values()) <= 1e-5, gaps
    for name in SHAREABLE:  # one adapter for the whole batch takes the single-adapter path: the same logits
        assert mixed_rows(shared, served, [name], rows=6, seed=1)[name] <= 1e-5, name
    assert {shared.slots[n].linear_head[0] for n in SHAREABLE} == {"pooled"}  # BERT's head, run as tensors ...
    for name in SHAREABLE:
        shared.slots[name].linear_head = None  # ... or through its model's own forward: the same logits
    assert max(mixed_rows(shared, served, SHAREABLE, rows=24, seed=2).values()) <= 1e-5
    # the check can fail: each adapter's head on the bare backbone (its per-row changes dropped) is far off
    for name in SHAREABLE:
        slot = shared.slots[name]
        bare = dataclasses.replace(slot, name=f"{name}-bare", lora={}, ia3_in={}, ia3_out={}, bias={}, adapter={},
                                   pfeiffer={}, prefix={}, prompt=None)
        shared.slots[bare.name] = bare
        served[bare.name] = {**served[name]}
        assert mixed_rows(shared, served, [name, bare.name], rows=12)[bare.name] > 1e-3, name


@pytest.fixture(scope="module")
def zh_mini_tasks(tmp_path_factory):
    """Adapters of three tasks on the committed zh-mini (its pooler is each adapter's own: the pretrained model
    has none): topic classification (LoRA, BitFit) and tagging (LoRA; prompt tuning with 7 virtual tokens)."""
    from peftbench.train import run

    root = tmp_path_factory.mktemp("zh-mini-mixed")
    zh_mini = Path(__file__).resolve().parents[1] / "leaderboards" / "zh-mini" / "model"
    runs = {"topic-lora": ["task.name=synthetic", "method.name=lora"],
            "topic-bitfit": ["task.name=synthetic", "method.name=bitfit", "train.seed=7"],
            "tags-lora": ["task.name=synthetic_ner", "method.name=lora"],
            "tags-prompt": ["task.name=synthetic_ner", "method.name=prompt", "method.num_virtual_tokens=7"]}
    ckpts = {}
    for name, args in runs.items():
        cfg = config.load(None, [*args, f"model.name_or_path={zh_mini}", "task.max_length=32",
                                 "task.max_train_samples=64", "train.batch_size=16", "train.max_steps=3",
                                 "train.lr=3e-2", "train.measure_inference=false", f"output_dir={root / name}"])
        ckpts[name] = Path(run(cfg).record["checkpoint"])
    return ckpts


def test_tasks_with_other_labels_and_token_heads_share_one_pass(zh_mini_tasks):
    shared, served, refused = serve_all(zh_mini_tasks)
    assert refused == {}
    assert {n: served[n]["logits"].shape[-1] for n in served} == {"topic-lora": 4, "topic-bitfit": 4,
                                                                  "tags-lora": 7, "tags-prompt": 7}
    gaps = mixed_rows(shared, served, list(served), rows=24)
    assert set(gaps) == set(served) and max(gaps.values()) <= 1e-5, gaps
    poolers = [shared.slots[n].head.stub.pooler.dense.weight for n in ("topic-lora", "topic-bitfit")]
    assert not torch.equal(*poolers)  # each adapter's own pooler (drawn with its run's seed), on its own rows
    assert [shared.slots[n].linear_head[0] for n in served] == ["pooled", "pooled", "token", "token"]


def test_removed_adapter_is_gone_and_the_others_still_mix(trained_variants):
    shared, served, _ = serve_all({v: Path(trained_variants[v].record["checkpoint"]) for v in ("lora", "ia3")})
    shared.remove("ia3")
    with pytest.raises(KeyError):
        mixed_rows(shared, served, ["lora", "ia3"], rows=4)
    assert mixed_rows(shared, served, ["lora"], rows=4)["lora"] <= 1e-5


@pytest.mark.slow
def test_the_mixed_batch_benchmark_prints_its_tables(monkeypatch, capsys):
    """benchmarks/serve_load.py --mixed on zh-mini, cut short: the throughput rows, and every method within 1e-5."""
    import sys

    import serve_load

    base = Path(__file__).resolve().parents[1] / "leaderboards" / "zh-mini" / "model"
    monkeypatch.setattr(sys, "argv", ["serve_load.py", "--mixed", str(base), "--passes", "1", "--sizes", "1,3"])
    serve_load.main()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "×" in line] == ["1", "3"]
    gaps = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in lines
            if line.startswith("| ") and line.count("|") == 4 and "method" not in line}
    assert len(gaps) == 9 and max(gaps.values()) <= 1e-5, out
