"""What a search would do before it runs (``sweep --dry-run``), variants weighed against the study's own
settings, and the runs a search takes from another's records (``reuse``)."""

import re
import shutil
from pathlib import Path

import pytest
from test_search import BEST, fake_runner, records_of, spec_at

from peftbench import search, sweep
from peftbench.errors import PeftbenchError
from peftbench.records import RECORD_NAME, make_record, read_record, write_atomic


def _trials(line: str) -> tuple[str, set[str], str]:
    """(count, each tried setting with its score, the chosen one) of a ``--dry-run`` line."""
    count = re.search(r": (\d+/\d+) trials", line).group(1)
    tried = set(filter(None, re.search(r"\[(.*)\]", line).group(1).split("; ")))
    chosen = re.search(r"; chosen ([^(]*?)(?: \(from its records\))?$", line)
    return count, tried, chosen.group(1) if chosen else ""


def test_a_variant_is_weighed_against_the_studys_own_settings_not_the_defaults(tmp_path):
    """A recipe on a cosine schedule may try the default linear one as a variant; a variant that repeats the
    study's own setting would be its plain run under another name, and is refused."""
    from peftbench.search.run import _variants

    cosine = {"train: {epochs: 1}": "train: {epochs: 1, scheduler: cosine}"}
    for name, scheduler in (("linear", "linear"), ("same", "cosine")):
        variants = f"final:\n  seeds: [1]\n  variants: {{{name}: {{train.scheduler: {scheduler}}}}}"
        spec = spec_at(tmp_path, **cosine, **{"final:\n  seeds: [1, 2, 3]": variants})
        study = search.studies(spec)[0]
        if name == "linear":
            assert _variants(study, spec["search"]) == [(None, {}), ("linear", {"train.scheduler": "linear"})]
        else:  # refused before the first trial, not after a whole search
            calls = tmp_path / "calls"
            with pytest.raises(PeftbenchError, match="'final.variants.same': .* already runs with "
                                                     "train.scheduler=cosine, so it would be its plain run"):
                search.run_search(search.studies(spec), spec["search"], runner=fake_runner(calls))
            assert not calls.exists()


def test_a_dry_run_starts_no_study(tmp_path):
    """Looking creates nothing: a study first seen by a dry run would keep that budget, and the real run, after
    an edit of the search, would be refused."""
    from peftbench.search.trials import stored_studies

    spec = spec_at(tmp_path)
    full, lora = search.studies(spec)
    search.run_search([full], spec["search"], runner=fake_runner(tmp_path / "calls"))
    lines = search.describe([full, lora], spec["search"])
    assert lines[0].startswith(f"{full.label}: 4/4 trials") and lines[1].startswith(f"{lora.label}: 0/4 trials")
    assert stored_studies(spec["search"]) == {full.name}
    edited = spec_at(tmp_path, trials=3)  # the search edited before lora's study started: allowed
    search.run_search([search.studies(edited)[1]], edited["search"], runner=fake_runner(tmp_path / "calls"))


def test_dry_run_without_the_database_reads_each_trial_back_from_its_records(tmp_path):
    """A clone holds the records but not search.db: the same trials, scores (two seeds each, a diverged rate
    shown as FAIL) and choice. A trial is its settings, not a number of one database; a run cut short from
    outside and a record of another budget do not count."""
    spec = spec_at(tmp_path)
    studies = search.studies(spec)
    search.run_search(studies, spec["search"], runner=fake_runner(tmp_path / "calls", fail_above=1e-2))
    with_db = search.describe(studies, spec["search"])
    out = Path(spec["output_dir"])
    (out / "search.db").unlink()
    assert [line.replace(" (from its records)", "") for line in search.describe(studies, spec["search"])] == with_db
    lora = _trials(with_db[1])
    assert lora[0] == "4/4" and "lr 0.03 FAIL" in lora[1] and lora[2] == "lr 0.00448"

    runs = {p: read_record(p) for p in (out / "search").glob(f"*/{RECORD_NAME}")}
    mine = {p: r for p, r in runs.items() if r["config"]["method"]["name"] == "lora"}
    renumbered = next(p for p, r in mine.items() if r["config"]["train"]["seed"] == 1)
    trial = mine[renumbered]["provenance"]["trial"]
    write_atomic(renumbered, {**mine[renumbered], "provenance": {**mine[renumbered]["provenance"],
                                                                 "trial": (trial + 1) % 4}})  # another database's
    assert _trials(search.describe(studies, spec["search"])[1]) == lora
    chosen = [p for p, r in mine.items() if r["config"]["train"]["lr"] == 4.48e-3]
    write_atomic(chosen[0], {**mine[chosen[0]], "interrupted": True})  # cut short: still to do
    count, tried, pick = _trials(search.describe(studies, spec["search"])[1])
    assert (count, pick) == ("3/4", "") and not any(t.startswith("lr 0.00448") for t in tried)
    write_atomic(chosen[0], {**mine[chosen[0]], "provenance": {**mine[chosen[0]]["provenance"],
                                                               "budget": {"trials": 5}}})  # another search's
    assert _trials(search.describe(studies, spec["search"])[1])[0] == "3/4"
    assert _trials(search.describe(studies, spec["search"])[0]) == _trials(with_db[0])  # full: untouched


def test_a_dry_run_counts_the_final_runs_to_reuse_at_the_choice_once_it_is_made(tmp_path):
    """The first sweep's folder holds LoRA's final runs at its chosen rate and, as if another search had chosen
    it, at another grid rate. Before the second sweep searches, its dry run counts a final run at any grid rate
    (6); once it has chosen, only those at its choice (3), with the database or from the records alone."""
    quiet = {"train: {epochs: 1}": "train: {epochs: 1, measure_inference: false}"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = spec_at(tmp_path / "a", **quiet)
    search.run_search(search.studies(first), first["search"], runner=fake_runner(tmp_path / "a-calls"))
    lora = search.studies(first)[1]
    chosen = {r["config"]["train"]["lr"] for r in records_of(tmp_path / "a" / "results", "final")
              if r["config"]["method"]["name"] == "lora"}
    other = next(lr for lr in search.grid_lrs(*first["search"].lr_range("lora"), 4) if lr not in chosen)
    for seed in first["search"].final_seeds:
        fake_runner(tmp_path / "a-calls")(lora.cell_cfg("final", {"lr": other}, seed), {
            "phase": "final", "study": lora.name, "budget": first["search"].budget("lora")})
    second = spec_at(tmp_path / "b", **quiet, **{"output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    reuse = sweep.reusable(second["reuse"])

    def counted():
        return search.describe(search.studies(second), second["search"], reuse=reuse)[1].partition("; to reuse: ")[2]

    assert counted() == "8 search, 6 final runs"
    search.run_search(search.studies(second), second["search"], runner=fake_runner(tmp_path / "b-calls"),
                      reuse=reuse)
    b = Path(second["output_dir"])
    for record in records_of(b, "final"):  # the finals are still to do; the choice is made
        if record["config"]["method"]["name"] == "lora":
            shutil.rmtree(b / "final" / record["run_id"])
    assert counted() == "0 search, 3 final runs"
    (b / "search.db").unlink()
    assert counted() == "0 search, 3 final runs"


def test_a_search_takes_the_identical_runs_of_another_from_reuse(tmp_path, monkeypatch):
    """A second sweep with one method more and ``reuse`` pointing at the first: the shared studies' search and
    final runs are copied in (the same run ids), only the new method's run, and the choices agree."""
    monkeypatch.setitem(BEST, "bitfit", 1e-2)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quiet = {"train: {epochs: 1}": "train: {epochs: 1, measure_inference: false}"}  # fake runs measure none
    first = spec_at(tmp_path / "a", **quiet)
    search.run_search(search.studies(first), first["search"], runner=fake_runner(tmp_path / "a-calls"))
    second = spec_at(tmp_path / "b", **quiet, **{"method.name: [full, lora]": "method.name: [full, lora, bitfit]",
                                                 "output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    studies, reuse = search.studies(second), sweep.reusable(second["reuse"])
    planned = search.describe(studies, second["search"], reuse=reuse)
    assert [line.partition("; to reuse: ")[2] for line in planned] == \
        ["", "8 search, 3 final runs", "8 search, 3 final runs"]  # bitfit, full, lora: what the run copies below
    failed = studies[1].cell_cfg("search", {"lr": search.grid_lrs(*second["search"].lr_range("full"), 4)[0]}, 1)
    write_atomic(f"{failed.output_dir}/{RECORD_NAME}", make_record("failed", failed.to_dict(), failed.run_id, {},
                                                                   error="DivergedError: nan"))
    assert search.describe(studies, second["search"], reuse=reuse)[1].endswith("7 search, 3 final runs")
    assert search.describe(studies, second["search"], reuse=reuse, retry_failed=True)[1].endswith(
        "8 search, 3 final runs")  # what --retry-failed would copy over it
    shutil.rmtree(failed.output_dir)
    outcome, waiting, no_final = search.run_search(search.studies(second), second["search"],
                                                   runner=fake_runner(tmp_path / "b-calls"),
                                                   reuse=sweep.reusable(second["reuse"]))
    assert waiting == no_final == [] and (outcome.reused, outcome.ran) == (2 * (4 * 2 + 3), 4 * 2 + 3)
    assert not any("to reuse" in line for line in search.describe(search.studies(second), second["search"],
                                                                   reuse=sweep.reusable(second["reuse"])))  # copied
    ran = set((tmp_path / "b-calls").read_text().split())
    b = Path(second["output_dir"])
    assert {r["run_id"] for r in records_of(b, "search") + records_of(b, "final")
            if r["config"]["method"]["name"] == "bitfit"} == ran
    for phase in ("search", "final"):
        shared = {r["run_id"]: r for r in records_of(tmp_path / "a" / "results", phase)}
        copied = {r["run_id"]: r for r in records_of(b, phase) if r["run_id"] in shared}
        assert copied == shared and len(shared) == {"search": 16, "final": 6}[phase]
    (tmp_path / "c").mkdir()  # 3 trials: the range's ends are runs of the first sweep, made under another budget
    third = spec_at(tmp_path / "c", trials=3, **quiet,
                    **{"output_dir:": f"reuse: [{tmp_path / 'a' / 'results'}]\noutput_dir:"})
    assert not any("to reuse" in line for line in search.describe(search.studies(third), third["search"],
                                                                  reuse=sweep.reusable(third["reuse"])))
    outcome, _, _ = search.run_search(search.studies(third), third["search"], runner=fake_runner(tmp_path / "c-calls"),
                                      reuse=sweep.reusable(third["reuse"]))
    ends = {r["run_id"] for r in records_of(tmp_path / "a" / "results", "search")} & \
        {r["run_id"] for r in records_of(Path(third["output_dir"]), "search")}
    assert len(ends) == 2 * 2 * 2 and (outcome.reused, outcome.ran) == (0, 2 * (3 * 2 + 3))  # methods x ends x seeds
