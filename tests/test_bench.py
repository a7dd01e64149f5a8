"""The throughput benchmark, the GPU script's smoke run, and the fast path they measure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import throughput as bench
import torch

from peftbench import config, models
from peftbench.measure import model_shape, train_flops
from peftbench.methods import RunContext, get_method, set_trainable, settle_dtypes
from peftbench.train import run


def test_train_flops_formula():
    shape = {"n_params": 1000, "n_trained": 1000, "layers": 2, "hidden": 8}
    assert train_flops(shape, [3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)  # full: 6N per token
    frozen = {**shape, "n_trained": 10}
    assert train_flops(frozen, [4]) == (4 * 1000 + 2 * 10) * 4 + 12 * 2 * 8 * 16  # frozen: 4N + 2N_trained


def test_model_shape_leaves_out_every_embedding_lookup():
    """An encoder's embeddings block and a decoder's ``embed_tokens`` alike: lookups, not matmuls."""
    from transformers import BertConfig, BertForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    small = {"vocab_size": 500, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64}
    bert = BertForSequenceClassification(BertConfig(**small))
    qwen = Qwen2ForSequenceClassification(Qwen2Config(**small, num_key_value_heads=1, pad_token_id=0))
    for model, lookups in ((bert, bert.bert.embeddings), (qwen, qwen.model.embed_tokens)):
        dense = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lookups.parameters())
        assert model_shape(model)["n_params"] == dense, type(model).__name__


def test_lengths_modes():
    assert bench.lengths_for("fixed", 5, 64) == [62] * 5
    tnews = bench.lengths_for("tnews", 500, 64)
    assert 10 <= sorted(tnews)[250] <= 40 and max(tnews) <= 62
    with pytest.raises(ValueError):
        bench.lengths_for("long", 5, 64)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``benchmarks/gpu.sh --smoke`` run: every GPU script on CPU with tiny shapes."""
    out = tmp_path_factory.mktemp("smoke")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this python
    done = subprocess.run(["bash", str(script), "--smoke", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    return out, done


@pytest.mark.slow
def test_gpu_script_smoke_run(smoke):
    out, done = smoke
    assert done.returncode == 0, done.stdout + done.stderr
    for step in ("bert-base", "large", "plan", "fsdp", "state", "matrix"):
        assert (out / f"{step}.json").is_file() and f"({step}: " in done.stdout, step
    table = (out / "targets.md").read_text().splitlines()
    assert table[0] == "| target | measured | met |" and len(table) == 2 + 9
    assert "| FSDP2 LoRA holds what the plan says (±15 %) | worst " in "\n".join(table)
    assert all(not line.endswith("| — |") for line in table[2:]), table  # every target measured
    assert "| planner within ±15 % of measured memory | worst " in "\n".join(table)
    assert "| every method × precision × base runs (or is refused by design) | 4/4 cells | yes |" in table


def test_gpu_script_writes_by_default_where_git_ignores():
    """Without OUT_DIR, gpu.sh writes under runs/ (git-ignored), never a new folder in the working tree."""
    root = Path(__file__).resolve().parents[1]
    defaults = [line.split("default=", 1)[1].split()[0] for line in (root / "benchmarks" / "gpu.sh").read_text(
        encoding="utf-8").splitlines() if "default=" in line and not line.lstrip().startswith("#")]
    assert len(defaults) == 2  # the GPU run's and the smoke run's
    if subprocess.run(["git", "rev-parse"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout: .gitignore is not read")
    ignored = subprocess.run(["git", "-c", "core.excludesFile=/dev/null", "check-ignore", "--no-index", *defaults],
                             cwd=root, capture_output=True, text=True).stdout.split()  # the project's .gitignore
    assert ignored == defaults and all(d.startswith("runs/") for d in defaults), (defaults, ignored)


@pytest.mark.slow
def test_bench_runs_every_loop_on_cpu(smoke):
    out, _ = smoke
    rows = json.loads((out / "bert-base.json").read_text())["rows"]
    assert [(r["lengths"], r["method"]) for r in rows] == [(m, k) for m in ("fixed", "tnews")
                                                           for k in ("full", "lora", "adapter")]
    by = {(r["lengths"], r["method"]): r for r in rows}
    assert by[("fixed", "adapter")]["plain"] is None and by[("fixed", "adapter")]["trainer"] is None  # not in PEFT
    for row in rows:
        a = row["peftbench"]
        assert a["samples_per_s"] > 0 and a["peak_memory_mb"] > 0 and 0 < a["mfu"] < 1
    fixed, short = by[("fixed", "lora")], by[("tnews", "lora")]
    for path in ("peftbench", "plain", "trainer"):
        assert fixed[path]["tokens_per_s"] == pytest.approx(32 * fixed[path]["samples_per_s"])  # every token real
        assert short[path]["tokens_per_s"] < 32 * short[path]["samples_per_s"]  # real tokens only, not padding
    for path in ("plain", "trainer"):
        assert fixed[path]["timed_steps"] == 2  # the warm-up step is left out
        assert by[("fixed", "full")]["peftbench"]["n_params"] == by[("fixed", "full")][path]["n_params"]
        assert fixed["peftbench"]["n_trained"] == fixed[path]["n_trained"]  # the same LoRA
    assert fixed["peftbench"]["n_trained"] < fixed["peftbench"]["n_params"]
    served = fixed["peftbench"]["inference"]
    assert set(served) == {"as_trained", "merged"} and fixed["plain"]["inference"]["plain"]["samples_per_s"] > 0
    printed = (out / "bert-base.md").read_text()
    assert "| tiny | fixed | lora | no |" in printed and "speed ×trainer" in printed and "speed ×plain" in printed
    assert "| p50 ms plain PEFT |" in printed and "| tiny | tnews | lora | no |" in printed.split("Inference")[1]


def test_bench_arguments():
    assert bench.parse_args([]).baselines == ["plain", "trainer"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--baselines", "plain,keras"])


def test_frozen_weights_kept_in_compute_dtype():
    tok = models.char_tokenizer(["北京欢迎你"])
    model = models.load_model(config.ModelConfig(), ["0", "1"], tok)[0]
    method = get_method("lora")(config.load(None, ["method.name=lora"]).method)
    model = method.apply(model, RunContext(total_steps=10, num_labels=2))
    set_trainable(model, method)
    sizes = settle_dtypes(model, "bf16")
    for name, p in model.named_parameters():  # layer norms stay fp32 (a few KB)
        assert p.dtype == (torch.float32 if p.requires_grad or "LayerNorm" in name else torch.bfloat16), name
    frozen = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad and "LayerNorm" not in n)
    norms = sum(p.numel() for n, p in model.named_parameters() if "LayerNorm" in n)
    assert norms < frozen / 100 and sizes["frozen_weight_bytes"] == 2 * frozen + 4 * norms
    assert settle_dtypes(model, "no")["frozen_weight_bytes"] == 2 * frozen + 4 * norms  # no casts


@pytest.mark.slow
@pytest.mark.parametrize("method,lr", [("lora", 5e-3), ("adapter", 5e-3), ("bitfit", 1e-2), ("prefix", 5e-3)])
def test_bf16_fast_path_trains_like_fp32(tmp_path, method, lr):
    records = {}
    for precision in ("no", "bf16"):
        cfg = config.load(None, ["task.name=synthetic", f"method.name={method}", "task.max_length=48", "train.epochs=4",
                                 "task.max_train_samples=320", "train.batch_size=16",  # bf16 is slow on most CPUs
                                 f"train.lr={lr}", f"train.mixed_precision='{precision}'",
                                 "train.save_checkpoint=false", "train.measure_inference=false",
                                 f"output_dir={tmp_path / precision}"])
        records[precision] = run(cfg).record
    fp32, bf16 = records["no"]["metrics"], records["bf16"]["metrics"]
    assert records["bf16"]["params"]["frozen_weight_bytes"] < records["no"]["params"]["frozen_weight_bytes"]
    assert fp32["accuracy"] > 0.45 and abs(bf16["accuracy"] - fp32["accuracy"]) < 0.05, (fp32, bf16)  # chance 0.25


def test_dynamic_padding_leaves_logits_unchanged():
    """Padding a batch to its longest text, not to the fixed length, computes the same logits."""
    texts = ["股钱债涨跌", "星影歌剧综艺的", "涨"]
    tokenizer = models.char_tokenizer(texts)
    torch.manual_seed(0)
    model = models.load_model(config.ModelConfig(), ["0", "1", "2", "3"], tokenizer)[0].eval()
    with torch.no_grad():
        longest = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        fixed = model(**tokenizer(texts, padding="max_length", max_length=128, return_tensors="pt")).logits
    torch.testing.assert_close(longest, fixed, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_length_grouped_batches_train_like_file_order(tmp_path, trained_variants):
    grouped = trained_variants["lora"].record  # the session's LoRA run: length-grouped batches (the default)
    assert grouped["config"]["train"]["group_by_length"] is True
    cfg = config.resolve({**grouped["config"], "output_dir": str(tmp_path / "file-order")})
    cfg.train.group_by_length = cfg.train.save_checkpoint = cfg.train.measure_inference = False
    records = {"true": grouped["metrics"]["accuracy"], "false": run(cfg).record["metrics"]["accuracy"]}
    assert records["false"] > 0.8 and abs(records["true"] - records["false"]) < 0.05, records


@pytest.mark.slow
def test_tricks_benchmark_prints_each_tricks_cost_against_plain(monkeypatch, capsys):
    import tricks as tricks_benchmark

    monkeypatch.setattr(sys, "argv", ["tricks.py", "--method", "prefix", "--steps", "8", "--batch-size", "8"])
    tricks_benchmark.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "trick" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(tricks_benchmark.TRICKS)
    refused = [r for r in rows if r.startswith("| layer decay")]  # prefix trains nothing inside a layer: a row says so
    assert len(refused) == 1 and "refused: config key 'train.layer_decay': none of the trained parameters" in refused[0]
    measured = [r for r in rows if r not in refused]
    assert measured[0].split(" | ")[2] == "×1.00" and all(float(r.split(" | ")[1]) > 0 for r in measured)
