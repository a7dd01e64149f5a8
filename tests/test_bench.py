"""The throughput benchmark and the fast path it measures."""

import json

import pytest
import torch

from peftbench import bench, config, models
from peftbench.methods import RunContext, get_method, set_trainable
from peftbench.train import frozen_weights_to_compute_dtype, run


def test_train_flops_formula():
    shape = {"n_params": 1000, "n_trained": 1000, "layers": 2, "hidden": 8}
    assert bench.train_flops(shape, [3, 5]) == 6 * 1000 * 8 + 12 * 2 * 8 * (9 + 25)  # full: 6N per token
    frozen = {**shape, "n_trained": 10}
    assert bench.train_flops(frozen, [4]) == (4 * 1000 + 2 * 10) * 4 + 12 * 2 * 8 * 16  # frozen: 4N + 2N_trained


def test_lengths_modes():
    assert bench.lengths_for("fixed", 5, 64) == [62] * 5
    tnews = bench.lengths_for("tnews", 500, 64)
    assert 10 <= sorted(tnews)[250] <= 40 and max(tnews) <= 62
    with pytest.raises(ValueError):
        bench.lengths_for("long", 5, 64)


def test_bench_runs_both_loops_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = bench.parse_args(["--arch", "tiny", "--methods", "full,lora,adapter", "--lengths", "fixed,tnews",
                             "--steps", "3", "--warmup", "1", "--batch-size", "8", "--seq-len", "32", "--out", str(out)])
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["lengths"], r["method"]) for r in rows] == [(m, k) for m in ("fixed", "tnews")
                                                           for k in ("full", "lora", "adapter")]
    by = {(r["lengths"], r["method"]): r for r in rows}
    assert by[("fixed", "adapter")]["plain"] is None  # PEFT has no bottleneck adapter
    for row in rows:
        a = row["peftbench"]
        assert a["samples_per_s"] > 0 and a["peak_memory_mb"] > 0 and 0 < a["mfu"] < 1
    fixed, short = by[("fixed", "lora")], by[("tnews", "lora")]
    for path in ("peftbench", "plain"):
        assert fixed[path]["tokens_per_s"] == pytest.approx(32 * fixed[path]["samples_per_s"])  # every token real
        assert short[path]["tokens_per_s"] < 32 * short[path]["samples_per_s"]  # real tokens only, not padding
    assert fixed["peftbench"]["n_trained"] < fixed["peftbench"]["n_params"]
    assert by[("fixed", "full")]["peftbench"]["n_params"] == by[("fixed", "full")]["plain"]["n_params"]
    printed = capsys.readouterr().out
    assert "| tiny | fixed | lora | no |" in printed and "speed ratio" in printed


def test_frozen_weights_kept_in_compute_dtype():
    tok = models.char_tokenizer(["北京欢迎你"])
    model = models.load_model(config.ModelConfig(), ["0", "1"], tok)
    method = get_method("lora")(config.load(None, ["method.name=lora"]).method)
    model = method.apply(model, RunContext(total_steps=10, num_labels=2))
    set_trainable(model, method)
    sizes = frozen_weights_to_compute_dtype(model, "bf16")
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert sizes["frozen_weight_bytes"] == 2 * frozen
    assert frozen_weights_to_compute_dtype(model, "no")["frozen_weight_bytes"] == 2 * frozen  # "no" casts nothing


@pytest.mark.parametrize("method,lr", [("lora", 5e-3), ("adapter", 5e-3)])
def test_bf16_fast_path_trains_like_fp32(tmp_path, method, lr):
    records = {}
    for precision in ("no", "bf16"):
        cfg = config.load(None, ["task.name=synthetic", f"method.name={method}", "task.max_length=48", "train.epochs=4",
                                 f"train.lr={lr}", f"train.mixed_precision='{precision}'", "train.save_checkpoint=false",
                                 f"output_dir={tmp_path / precision}"])
        records[precision] = run(cfg).record
    fp32, bf16 = records["no"]["metrics"], records["bf16"]["metrics"]
    assert records["bf16"]["params"]["frozen_weight_bytes"] < records["no"]["params"]["frozen_weight_bytes"]
    assert fp32["accuracy"] > 0.8 and abs(bf16["accuracy"] - fp32["accuracy"]) < 0.05, (fp32, bf16)
