"""Masked-LM pretraining: masking statistics, vocabulary, packing, loss, resume, the eval-text guard."""

import json
import math
import random
import re
import stat

import pytest
import torch
from conftest import tensorboard_scalars, torchrun, write_jsonl

from peftbench import checkpoint, config, pretrain
from peftbench.errors import PeftbenchError
from peftbench.records import FILE_MODE, PRETRAIN_RECORD_NAME
from peftbench.tasks.synthetic import generate_splits
from peftbench.train import run

TINY_ARCH = "model.architecture={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 128}"


IDIOMS = ("一心一意 三心二意 七上八下 十全十美 四面八方 五湖四海 "
          "千军万马 万紫千红 画龙点睛 对牛弹琴 守株待兔 亡羊补牢 "
          "井底之蛙 杯弓蛇影 刻舟求剑 掩耳盗铃 叶公好龙 狐假虎威 "
          "胸有成竹 望梅止渴 卧薪尝胆 破釜沉舟 指鹿为马 塞翁失马").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Unlabeled text in FewCLUE's ``unlabeled.json`` shape: idioms drawn by a Zipf law (frequent characters
    and fixed four-character contexts to learn), then a synthetic-task sentence (its characters)."""
    rng = random.Random(5)
    weights = [1 / rank for rank in range(1, len(IDIOMS) + 1)]
    sentences = generate_splits(seed=5, sizes={"unlabeled": 2500})["unlabeled"]
    docs = ["".join(rng.choices(IDIOMS, weights, k=rng.randint(2, 6))) + r["sentence"] for r in sentences]
    path = tmp_path_factory.mktemp("corpus") / "unlabeled.json"
    return write_jsonl(path, [{"sentence": d, "id": i} for i, d in enumerate(docs)])


def quick_cfg(corpus, out, *extra):
    return pretrain.load_config(None, [f"corpus.files=[{corpus}]", "model.from_scratch=true", TINY_ARCH,
                                       "mask.block_size=64", "train.batch_size=16", "train.lr=5e-3",
                                       "train.log_every=4", "train.eval_every=8", f"output_dir={out}", *extra])


def test_a_corpus_of_one_block_is_refused_not_trained_forever(tmp_path):
    """Its one block is held out for evaluation: training would have no batch, and no step would ever come."""
    one = write_jsonl(tmp_path / "one.json", [{"sentence": "股市今天大涨，投资者信心回升。" * 5}])
    with pytest.raises(PeftbenchError, match="makes 1 block.* all held out for evaluation"):
        pretrain.pretrain(quick_cfg(one, tmp_path / "pt", "train.max_steps=4"))


def test_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 128), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    words = torch.arange(ids.numel()).view_as(ids)
    words[:, 0] = words[:, -1] = -1
    inputs, labels = pretrain.mask_tokens(ids, words, 0.15, 4, torch.arange(10, 1000), gen)
    chosen = labels != -100
    real = words >= 0
    assert not chosen[~real].any(), "special tokens must never be masked"
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum().item() / real.sum().item() - 0.15) < 0.005
    n = chosen.sum().item()
    masked = (inputs == 4) & chosen
    unchanged = (inputs == ids) & chosen
    swapped = chosen & ~masked & ~unchanged
    assert abs(masked.sum().item() / n - 0.8) < 0.015
    assert abs(swapped.sum().item() / n - 0.1) < 0.01  # a random token equal to the original counts as unchanged
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_whole_word_masking_masks_all_tokens_of_a_word():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (50, 66), generator=gen)
    words = (torch.arange(ids.numel()) // 3).view_as(ids)  # words of three tokens
    _, labels = pretrain.mask_tokens(ids, words, 0.15, 4, torch.arange(10, 100), gen)
    chosen = (labels != -100).view(-1)
    per_word = chosen.view(-1, 3).float().sum(1)
    assert set(per_word.tolist()) <= {0.0, 3.0}
    assert 0.1 < chosen.float().mean().item() < 0.2


def test_masking_is_reproducible_from_the_generator():
    ids = torch.randint(10, 100, (8, 32))
    words = torch.arange(ids.numel()).view_as(ids)
    a = pretrain.mask_tokens(ids, words, 0.15, 4, torch.arange(10, 100), torch.Generator().manual_seed(3))
    b = pretrain.mask_tokens(ids, words, 0.15, 4, torch.arange(10, 100), torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_pack_blocks_and_word_ids(tmp_path):
    from peftbench.models import char_tokenizer

    docs = ["我们在北京", "今天天气很好", "abc"]
    tok = char_tokenizer(docs)
    ids, words = pretrain.pack(docs * 10, tok, 16, whole_word=False)
    assert ids.shape[1] == 16 and (ids[:, 0] == tok.cls_token_id).all() and (ids[:, -1] == tok.sep_token_id).all()
    special = torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id]))
    assert torch.equal(special, words < 0)
    flat = [t for row in ids[:, 1:-1].tolist() for t in row]
    expected = tok("我们在北京")["input_ids"][1:-1] + [tok.sep_token_id]
    assert flat[: len(expected)] == expected


def test_pack_whole_word_groups_jieba_words():
    pytest.importorskip("jieba")
    from peftbench.models import char_tokenizer

    docs = ["我们在北京大学学习自然语言处理"] * 8
    tok = char_tokenizer(docs)
    _, words = pretrain.pack(docs, tok, 32, whole_word=True)
    row = words[0, 1:16].tolist()  # the first document's 15 characters
    assert len(set(row)) < len(row), "multi-character words share a word id"
    assert row == sorted(row)


def test_char_vocab_saved_as_vocab_txt_round_trips(corpus, tmp_path):
    from transformers import AutoTokenizer, BertTokenizer

    record = pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=2", "model.vocab_min_freq=1"))
    model_dir = tmp_path / "pt" / "model"
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert record["params"]["vocab_size"] == len(vocab) - 1  # trailing newline
    text = json.loads(corpus.read_text(encoding="utf-8").split("\n")[0])["sentence"]
    from_vocab = BertTokenizer(vocab=str(model_dir / "vocab.txt"))
    auto = AutoTokenizer.from_pretrained(str(model_dir))
    assert from_vocab(text)["input_ids"] == auto(text)["input_ids"]
    assert auto.decode(auto(text)["input_ids"], skip_special_tokens=True).replace(" ", "") == text
    assert auto.unk_token_id not in auto(text)["input_ids"]


def test_pretraining_lowers_mlm_loss_and_the_model_fine_tunes(corpus, tmp_path):
    from transformers import AutoModelForSequenceClassification

    record = pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=48"))
    curve = record["eval_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 48
    assert curve[-1]["mlm_loss"] < curve[0]["mlm_loss"] - 0.5, curve
    assert record["metrics"]["stopped_by"] == "max_steps"
    assert record["metrics"]["train_tokens_per_s"] > 0 and record["metrics"]["peak_memory_mb"] > 0
    assert not (tmp_path / "pt" / "checkpoint").exists(), "a finished run keeps no resume checkpoint"

    model_dir = tmp_path / "pt" / "model"
    assert {stat.S_IMODE(p.stat().st_mode) for p in model_dir.rglob("*") if p.is_file()} == {FILE_MODE}
    assert AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=4).config.num_labels == 4
    cfg = config.load(None, ["task.name=synthetic", f"model.name_or_path={model_dir}", "method.name=full",
                             "task.max_length=48", "train.epochs=4", "train.lr=1e-3", "train.measure_inference=false",
                             f"output_dir={tmp_path / 'ft'}"])
    result = run(cfg).record
    assert result["metrics"]["accuracy"] > 0.5  # chance is 0.25
    assert result["backbone"]["random_init"] is False
    assert result["backbone"]["pretrained_by_peftbench"]["run_id"] == record["run_id"]


def test_a_rebuild_says_whether_it_matches_the_reference_backbone(corpus, tmp_path):
    first = pretrain.pretrain(quick_cfg(corpus, tmp_path / "a", "train.max_steps=8"))
    reference = tmp_path / "a" / "model"
    again = quick_cfg(corpus, tmp_path / "b", "train.max_steps=8", f"reference={reference}")
    assert again.run_id == first["run_id"]  # what it is compared with is no part of what it is
    same = pretrain.pretrain(again)["reference"]
    assert same["matches"] and same["fingerprint"] == same["rebuilt_fingerprint"] == \
        checkpoint.backbone_fingerprint(str(reference), None, random_init=False)
    assert pretrain.describe_reference(same) == f"rebuild matches {reference} (fingerprint {same['fingerprint'][:12]})"
    other = pretrain.pretrain(quick_cfg(corpus, tmp_path / "c", "train.max_steps=8", "train.seed=7",
                                        f"reference={reference}"))["reference"]
    assert not other["matches"] and other["max_abs_weight_diff"] > 1e-3
    assert other["reference_mlm_loss"] == first["metrics"]["mlm_loss"] != other["mlm_loss"]
    line = pretrain.describe_reference(other)
    assert line.startswith(f"rebuild differs from {reference}: fingerprint ") and "max |weight difference| " in line
    assert f"(reference {first['metrics']['mlm_loss']:.4f})" in line
    with pytest.raises(PeftbenchError, match="config key 'reference': .* is not a model folder"):
        quick_cfg(corpus, tmp_path / "d", f"reference={tmp_path / 'nowhere'}")


def interrupt_after_checkpoint(monkeypatch, step: int) -> None:
    """Make a run die (as on Ctrl-C) right after writing its checkpoint of ``step``."""
    real_save = checkpoint.save_training_state

    def save_then_die(accelerator, state, *args):
        real_save(accelerator, state, *args)
        if state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_die)


@pytest.mark.parametrize("documents", [None, 160], ids=["in-one-epoch", "across-epochs"])
def test_resume_after_interruption_continues_exactly(corpus, tmp_path, monkeypatch, documents, capsys):
    """Killed at step 8 of 12: inside the first epoch of the whole corpus; on 160 documents (5 steps an epoch)
    in the second epoch, the third still to come (each epoch shuffles by its own number)."""
    if documents:
        small = tmp_path / "small.json"
        small.write_text("".join(corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:documents]),
                         encoding="utf-8")
        corpus = small
    args = ["train.max_steps=12", "train.save_every=4", "train.eval_every=4"]
    full = pretrain.pretrain(quick_cfg(corpus, tmp_path / "full", *args))
    assert (full["data"]["epochs_seen"] > 2) == bool(documents)
    interrupt_after_checkpoint(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "cut", *args))
    assert json.loads((tmp_path / "cut" / "checkpoint" / "loop_state.json").read_text())["step"] == 8
    monkeypatch.undo()
    state = tmp_path / "cut" / "checkpoint"
    state.rename(state.with_name("checkpoint.old"))  # killed between the swap's two renames: the whole state
    state.with_name("checkpoint.tmp").mkdir()  # stepped aside, and a half-written one beside it
    capsys.readouterr()
    resumed = pretrain.pretrain(quick_cfg(corpus, tmp_path / "cut", *args))
    assert "at step 8" in capsys.readouterr().out
    assert not list((tmp_path / "cut").glob("checkpoint*"))  # nothing left to resume

    assert resumed["loss_curve"] == full["loss_curve"]
    assert resumed["eval_curve"] == full["eval_curve"]
    assert math.isfinite(resumed["metrics"]["train_tokens_per_s"]) and resumed["metrics"]["train_tokens_per_s"] > 0
    assert resumed["metrics"]["timed_steps"] > 0  # the resumed session timed its own steps
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_new_run_that_crashes_keeps_the_last_whole_model_and_its_record(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pt"
    first = pretrain.pretrain(quick_cfg(corpus, out, "train.max_steps=4", "train.save_every=2"))
    before = {p.name: p.read_bytes() for p in (out / "model").iterdir()}
    real_save = checkpoint.save_training_state

    def save_then_crash(*args):
        real_save(*args)
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(checkpoint, "save_training_state", save_then_crash)
    from peftbench.cli import main

    assert main(["pretrain", f"corpus.files=[{corpus}]", "model.from_scratch=true", TINY_ARCH, "mask.block_size=64",
                 "train.batch_size=16", "train.max_steps=4", "train.save_every=2", "train.lr=1e-3",
                 f"output_dir={out}"]) == 1  # another run into the same folder, which crashes
    assert f"(the earlier successful run in {out} is kept)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "model").iterdir()} == before  # not its vocabulary, say
    assert json.loads((out / PRETRAIN_RECORD_NAME).read_text())["run_id"] == first["run_id"]


def test_an_unreadable_rng_state_is_refused(corpus, tmp_path, monkeypatch):
    interrupt_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))
    monkeypatch.undo()
    (tmp_path / "pt" / "checkpoint" / "random_states_0.pkl").write_bytes(b"truncated")
    with pytest.raises(PeftbenchError, match=r"random_states_0\.pkl: the RNG state cannot be read"):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))


def test_resume_refuses_a_checkpoint_of_another_config(corpus, tmp_path, monkeypatch):
    interrupt_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))
    monkeypatch.undo()
    with pytest.raises(PeftbenchError, match="different configuration"):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4",
                                    "train.lr=1e-3"))
    loop_state = tmp_path / "pt" / "checkpoint" / "loop_state.json"
    assert json.loads(loop_state.read_text())["processes"] == 1
    loop_state.write_text(json.dumps({**json.loads(loop_state.read_text()), "processes": 2}))  # saved by two
    with pytest.raises(PeftbenchError, match="a training state of 2 processes; resume it with as many"):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))
    loop_state.write_text(json.dumps({**json.loads(loop_state.read_text()), "processes": 1}))
    vocab = (tmp_path / "pt" / pretrain.VOCAB_FILE).read_text(encoding="utf-8")
    (tmp_path / "pt" / pretrain.VOCAB_FILE).unlink()
    with pytest.raises(PeftbenchError, match="the vocabulary of the run to resume is missing"):
        pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))
    (tmp_path / "pt" / "model").mkdir()
    (tmp_path / "pt" / "model" / "vocab.txt").write_text(vocab, encoding="utf-8")  # where earlier runs kept it
    pretrain.pretrain(quick_cfg(corpus, tmp_path / "pt", "train.max_steps=8", "train.save_every=4"))  # resumes
    assert sorted(p.name for p in (tmp_path / "pt").iterdir()) == ["model", PRETRAIN_RECORD_NAME]  # nothing left
    assert (tmp_path / "pt" / "model" / "vocab.txt").read_text(encoding="utf-8") == vocab


def test_eval_text_guard(tmp_path):
    dev = write_jsonl(tmp_path / "tnews" / "dev_few_all.json", [{"sentence": "今天天气很好"}])
    with pytest.raises(PeftbenchError, match=r"dev_few_all\.json: named like a task's dev/test file.*allow_eval_text"):
        pretrain.read_documents([str(dev)], ["sentence"])
    for name in ("test_public.json", "dev.json", "test.json", "dev_3.json"):
        with pytest.raises(PeftbenchError, match="allow_eval_text"):
            pretrain.check_not_eval_text(tmp_path / name, allow=False)
    assert pretrain.read_documents([str(dev)], ["sentence"], allow_eval_text=True) == ["今天天气很好"]
    pretrain.check_not_eval_text(tmp_path / "unlabeled.json", allow=False)


def test_corpus_formats_and_errors(tmp_path):
    jl = write_jsonl(tmp_path / "a.json",
                     [{"sentence": " 一 "}, {"content": "二", "id": 1}, {"sentence1": "x", "sentence2": "y"}])
    txt = tmp_path / "b.txt"
    txt.write_text("三\n\n四\u2028五\n", encoding="utf-8")
    docs = pretrain.read_documents([str(jl), str(txt)], ["sentence", "content", "sentence1", "sentence2"])
    assert docs == ["一", "二", "x", "y", "三", "四\u2028五"]
    with pytest.raises(PeftbenchError, match=r"a\.json:3.*no text field"):
        pretrain.read_documents([str(jl)], ["sentence", "content"])
    with pytest.raises(PeftbenchError, match="exactly one"):
        pretrain.load_config(None, [f"corpus.files=[{jl}]"])
    with pytest.raises(PeftbenchError, match="corpus.files"):
        pretrain.load_config(None, ["model.from_scratch=true"])
    with pytest.raises(PeftbenchError, match="unknown config key 'mask.prob'"):
        pretrain.load_config(None, [f"corpus.files=[{jl}]", "model.from_scratch=true", "mask.prob=0.2"])
    recipe = tmp_path / "pt.yaml"
    recipe.write_text(f"corpus: {{files: [{jl}]}}\nmodel: {{from_scratch: true}}\nmask:\n  block_size: 4\n")
    with pytest.raises(PeftbenchError, match=f"^{re.escape(str(recipe))}:4: config key 'mask.block_size' must be >= 8"):
        pretrain.load_config(str(recipe), [])  # a pretraining recipe's bad value is named with its line too


@pytest.mark.slow
def test_two_processes_pretrain(corpus, tmp_path):
    proc = torchrun(2, "pretrain", f"corpus.files=[{corpus}]", "model.from_scratch=true", TINY_ARCH,
                    "mask.block_size=64",
                    "train.batch_size=8", "train.lr=5e-3", "train.max_steps=30", "train.log_every=5",
                    "train.eval_every=10", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / PRETRAIN_RECORD_NAME).read_text())
    assert record["env"]["num_processes"] == 2 and len(record["metrics"]["peak_memory_mb_per_process"]) == 2
    assert record["eval_curve"][-1]["mlm_loss"] < record["eval_curve"][0]["mlm_loss"] - 0.5
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_continued_pretraining_with_lora_merges_into_a_plain_model(corpus, tmp_path):
    from safetensors.torch import load_file

    pretrain.pretrain(quick_cfg(corpus, tmp_path / "base", "train.max_steps=8"))
    base_dir = tmp_path / "base" / "model"
    cfg = pretrain.load_config(None, [f"corpus.files=[{corpus}]", f"model.name_or_path={base_dir}", "model.lora_r=4",
                                      "mask.block_size=64", "train.batch_size=16", "train.lr=5e-3",
                                      "train.max_steps=16", "train.eval_every=8",
                                      f"output_dir={tmp_path / 'continued'}"])
    record = pretrain.pretrain(cfg)
    assert record["params"]["trainable"] < record["params"]["total"] / 5  # adapters only
    assert record["eval_curve"][-1]["mlm_loss"] < record["eval_curve"][0]["mlm_loss"]
    before = load_file(base_dir / "model.safetensors")
    after = load_file(tmp_path / "continued" / "model" / "model.safetensors")
    assert after.keys() == before.keys(), "LoRA is merged: the saved model has the base's tensors, no adapter"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("attention" in k or "dense" in k for k in changed)


def test_time_budget_stops_and_fits_the_schedule(corpus, tmp_path):
    record = pretrain.pretrain(quick_cfg(corpus, tmp_path, "train.max_steps=100000", "train.max_minutes=0.05",
                                         "train.eval_every=100000"))
    m = record["metrics"]
    assert m["stopped_by"] == "time" and 0 < m["steps"] < 100000
    assert m["train_seconds"] < 30
    assert record["eval_curve"][-1]["step"] == m["steps"]  # evaluated at the (re-planned) end


def test_pretraining_reports_to_tensorboard(corpus, tmp_path):
    record = pretrain.pretrain(quick_cfg(corpus, tmp_path, "train.max_steps=8", "train.report_to=[tensorboard]"))
    board = tensorboard_scalars(tmp_path / checkpoint.TRACKERS_DIR / "peftbench")
    assert [step for step, _ in board["train/loss"]] == [point["step"] for point in record["loss_curve"]]
    assert [v for _, v in board["eval/mlm_loss"]] == pytest.approx([p["mlm_loss"] for p in record["eval_curve"][1:]])
    assert board["final/mlm_loss"] == [(8, pytest.approx(record["metrics"]["mlm_loss"]))]
