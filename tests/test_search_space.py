"""A search over more than the learning rate: spaces of any method or train key, drawn, recorded, chosen and
tabled; final variants at the chosen rate."""

import math
import re
from collections import Counter
from pathlib import Path

import pytest
from test_search import BEST, fake_runner, records_of, spec_at

from peftbench import leaderboard, search
from peftbench.errors import PeftbenchError
from peftbench.leaderboard.table import lr_table
from peftbench.records import RECORD_NAME, read_record, write_atomic

SPACE = """\
  space:
    lora: {method.r: [4, 8, 16], train.warmup_ratio: {low: 0.0, high: 0.2}}
"""


def test_a_search_space_beyond_the_rate_is_drawn_recorded_chosen_and_tabled(tmp_path):
    """LoRA searches its rank and warm-up beside the rate, full only the rate, each with 5 trials; the fake dev
    score peaks at rank 8. The final runs take the best trial's every setting, and the table shows them."""
    spec = spec_at(tmp_path, trials=5, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n" + SPACE})
    runner = fake_runner(tmp_path / "calls")

    def ranked(cfg, provenance=None):
        result = runner(cfg, provenance)
        if cfg.method.name == "lora":  # the rank matters too
            result.record["metrics"]["score"] -= 0.05 * abs(math.log2(cfg.method.r / 8))
            write_atomic(f"{cfg.output_dir}/{RECORD_NAME}", result.record)
        return result

    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"], runner=ranked)
    assert waiting == no_final == [] and outcome.failed == 0
    out = Path(spec["output_dir"])
    tried = [r for r in records_of(out, "search") if r["config"]["method"]["name"] == "lora"]
    assert len(tried) == 5 * 2 and {r["config"]["method"]["r"] for r in tried} <= {4, 8, 16}
    assert all(0.0 <= r["config"]["train"]["warmup_ratio"] <= 0.2 for r in tried)
    assert all(r["provenance"]["budget"]["space"] == {"method.r": {"choices": [4, 8, 16]}, "train.warmup_ratio": {
        "low": 0.0, "high": 0.2, "log": False, "int": False}} for r in tried)
    trials = {}
    for r in tried:
        key = (r["config"]["train"]["lr"], r["config"]["method"]["r"], r["config"]["train"]["warmup_ratio"])
        trials.setdefault(key, []).append(r["metrics"]["score"])
    best = max(trials, key=lambda k: (sum(trials[k]) / len(trials[k]), -k[0]))
    final = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "lora"]
    assert len(final) == 3 and all((r["config"]["train"]["lr"], r["config"]["method"]["r"],
                                    r["config"]["train"]["warmup_ratio"]) == best for r in final)
    assert final[0]["provenance"]["chosen_settings"] == {"method.r": best[1], "train.warmup_ratio": best[2]}
    full = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "full"]
    assert "space" not in full[0]["provenance"]["budget"] and "chosen_settings" not in full[0]["provenance"]
    (group,) = leaderboard.build(leaderboard.collect([out])[0])
    full_row, lora_row = sorted(group.rows.values(), key=lambda row: row.method)  # one row each: r splits none
    assert full_row.label == "full (lr tuned)" and len(lora_row.records) == 3
    assert lora_row.label.endswith("lr, r, warmup_ratio tuned)") and " r=" not in lora_row.label
    assert "learning rate and r, warmup_ratio searched: 5 trials per method (tpe" in group.budget
    title, header, rows = lr_table(group)
    assert title.startswith("Settings chosen on dev by the search") and header == ["method", "synthetic"]
    assert rows[1] == [lora_row.label, f"{best[0]:.3g}; r={best[1]}; warmup_ratio={best[2]:.3g}"]
    dropped = spec_at(tmp_path, trials=5, sampler="tpe")  # the same search without its space: refused
    with pytest.raises(PeftbenchError, match="field 'search' sets space None for synthetic-lora-"):
        search.run_search(search.studies(dropped), dropped["search"], runner=ranked)


def test_a_peft_tuners_own_option_is_searched_through_its_options(tmp_path, monkeypatch):
    """``method.options.r`` of the bridge's VeRA (docs/sweeps.md's example): each trial's runs hold the drawn
    rank in their config's options, the final runs the chosen one, and the table names it."""
    monkeypatch.setitem(BEST, "vera", 1e-2)
    space = "  space:\n    vera: {method.options.r: [64, 256]}\n"
    spec = spec_at(tmp_path, trials=3, sampler="tpe", **{"method.name: [full, lora]": "method.name: [full, vera]",
                                                         "  sampler: tpe\n": "  sampler: tpe\n" + space})
    outcome, waiting, no_final = search.run_search(search.studies(spec), spec["search"],
                                                   runner=fake_runner(tmp_path / "calls"))
    assert waiting == no_final == [] and outcome.failed == 0
    out = Path(spec["output_dir"])
    tried = [r for r in records_of(out, "search") if r["config"]["method"]["name"] == "vera"]
    assert tried and {r["config"]["method"]["options"]["r"] for r in tried} <= {64, 256}
    final = [r for r in records_of(out, "final") if r["config"]["method"]["name"] == "vera"]
    chosen = final[0]["provenance"]["chosen_settings"]
    assert set(chosen) == {"method.options.r"} and all(r["config"]["method"]["options"]["r"] == chosen[
        "method.options.r"] for r in final)
    (group,) = leaderboard.build(leaderboard.collect([out])[0])
    _, _, rows = lr_table(group)
    assert any(f"options.r={chosen['method.options.r']}" in row[1] for row in rows), rows


@pytest.mark.parametrize("space, message", [
    ("  space:\n    lora: {method.r: [4, 8]}\n", "field 'search.space' needs sampler: tpe"),
    ("  space:\n    lora: {train.lr: [1e-3]}\n", "'search.space.lora.train.lr': not a searchable key"),
    ("  space:\n    lora: {method.rank: [4]}\n", "'search.space.lora.method.rank': not a searchable key"),
    ("  space:\n    lora: {method.r: {low: 8, high: 4}}\n", "'search.space.lora.method.r' must be a list of values"),
    ("  space:\n    lora: {method.dropout: {low: 0, high: 0.3, log: true}}\n", "log: true needs low > 0"),
    ("  space:\n    lora: {method.r: [0, 8]}\n", "'search.space.lora.method.r': 0 does not make a valid run"),
    ("  space:\n    lora: {train.epochs: [1, 2]}\n", "'search.space.lora.train.epochs': not a searchable key"),
])
def test_bad_search_spaces_name_the_field(tmp_path, space, message):
    sampler = "grid" if "needs sampler" in message else "tpe"
    with pytest.raises(PeftbenchError, match=re.escape(message)):
        spec_at(tmp_path, sampler=sampler, **{f"  sampler: {sampler}\n": f"  sampler: {sampler}\n" + space})


def test_a_searched_key_the_sweep_sets_is_refused(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n" + SPACE,
                                               "  method.name: [full, lora]": "  method: [{name: lora, r: 4}]"})
    with pytest.raises(PeftbenchError, match=r"field 'search.space.lora.method.r': the sweep sets it too \(4 in "):
        search.studies(spec)


def test_a_float_key_searched_between_integers_draws_floats(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"  sampler: tpe\n": "  sampler: tpe\n  space:\n    lora: "
                                                                    "{method.dropout: {low: 0, high: 0}}\n"})
    assert spec["search"].space["lora"]["method.dropout"] == {"low": 0.0, "high": 0.0, "log": False, "int": False}


def test_an_optional_integer_key_searched_over_a_range_draws_integers(tmp_path):
    spec = spec_at(tmp_path, sampler="tpe", **{"method.name: [full, lora]": "method.name: [full, adapter]",
                                               "  sampler: tpe\n": "  sampler: tpe\n  space:\n    adapter: "
                                                                    "{method.bottleneck: {low: 16, high: 128}}\n"})
    assert spec["search"].space["adapter"]["method.bottleneck"] == {"low": 16, "high": 128, "log": False, "int": True}


def test_a_record_from_before_a_key_existed_shares_the_row_of_one_at_its_default(tmp_path):
    """LoRA records written before method.b_lr_ratio and method.train_a existed pool with new ones at their
    defaults (LATER_KEYS), as their run ids do."""
    from peftbench import config

    for seed, old in ((1, True), (2, False)):
        cfg = config.load(None, ["method.name=lora", f"train.seed={seed}", f"output_dir={tmp_path / str(seed)}"])
        body = cfg.to_dict()
        if old:
            del body["method"]["b_lr_ratio"], body["method"]["train_a"]
        fake_runner(tmp_path / "calls")(config.resolve(body), {})
        if old:  # the record as an older peftbench wrote it
            record = read_record(tmp_path / str(seed) / RECORD_NAME)
            del record["config"]["method"]["b_lr_ratio"], record["config"]["method"]["train_a"]
            write_atomic(tmp_path / str(seed) / RECORD_NAME, record)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert [len(row.records) for row in group.rows.values()] == [2]


def test_final_variants_run_at_the_chosen_rate_and_are_compared_with_the_plain_row(tmp_path):
    """A study's training tricks run at the rate its search chose for the plain run: one row per trick, each
    with its difference to the plain tuned row."""
    variants = "final:\n  seeds: [1, 2, 3]\n  variants:\n    smooth: {train.label_smoothing: 0.1}\n" \
               "    ema: {train.ema_decay: 0.99, train.scheduler: cosine, methods: [lora]}"
    spec = spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]": variants})
    assert spec["search"].final_variants == {"smooth": {"train.label_smoothing": 0.1}, "ema": {
        "train.ema_decay": 0.99, "train.scheduler": "cosine", "methods": ["lora"]}}
    out = Path(spec["output_dir"])
    search.run_search(search.studies(spec), spec["search"], runner=fake_runner(tmp_path / "calls"))
    final = records_of(out, "final")
    assert len(final) == (2 + 3) * 3  # (full: plain + smooth; lora: plain + smooth + ema) x seeds
    for method in ("full", "lora"):
        mine = [r for r in final if r["config"]["method"]["name"] == method]
        assert len({r["config"]["train"]["lr"] for r in mine}) == 1  # every variant at the chosen rate
        assert Counter(r["provenance"]["variant"] for r in mine) == {None: 3, "smooth": 3, **(
            {"ema": 3} if method == "lora" else {})}
        assert all(r["config"]["train"]["label_smoothing"] == 0.1 for r in mine if r["provenance"].get("variant")
                   == "smooth")
    (group,) = leaderboard.build(leaderboard.collect([out / "final"])[0])
    assert len(group.rows) == 5
    plain = {row.method: row.label for row in group.rows.values() if not row.tricks}
    assert {label: ref.label for label, ref in group.references.items()} == {
        row.label: plain[row.method] for row in group.rows.values() if row.tricks}
    with pytest.raises(PeftbenchError, match="final.variants.bad.train.lr'.*other than the rate"):
        spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]": "final:\n  seeds: [1]\n  variants: {bad: {train.lr: 1}}"})
    with pytest.raises(PeftbenchError, match="final.variants.bad.train.adversarial'.*does not make a valid run"):
        spec_at(tmp_path, **{"final:\n  seeds: [1, 2, 3]":
                             "final:\n  seeds: [1]\n  variants: {bad: {train.adversarial: fgsm}}"})
