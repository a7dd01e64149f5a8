"""Tables compare only what is comparable: one table per backbone (by its files' fingerprint), a column per
data, settings and loader version, footnotes for cells pooling library versions or CPU kernels, and the
machine-readable forms (JSON, model-index) that hold every cell."""

import json
import statistics

import pytest
import torch
import yaml
from test_leaderboard import BASELINES, ENV, record, stamped

from peftbench import config, leaderboard
from peftbench.errors import PeftbenchError
from peftbench.records import environment, write_atomic


def test_two_backbones_saved_to_one_path_are_two_tables(tmp_path):
    """Two pretraining runs written to one folder (the same path and pretraining run id in their records): the
    fingerprints tell them apart, and the titles say which is which."""
    for seed in (1, 2):
        stamped(tmp_path, f"old-{seed}", "1fa46664", seed=seed, acc=0.5)
        stamped(tmp_path, f"new-{seed}", "726f3ac8", seed=seed, acc=0.7)
    groups = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert len(groups) == 2
    assert sorted(g.title.split(" · ")[0] for g in groups) == [
        "zh-mini (pretrained by peftbench, run 726f3ac8) (1fa46664)",
        "zh-mini (pretrained by peftbench, run 726f3ac8) (726f3ac8)"]
    assert sorted(g.rows[next(iter(g.rows))].cells["tnews"].mean for g in groups) == [0.5, 0.7]
    assert len({g.slug for g in groups}) == 2


def test_other_data_or_settings_or_loader_versions_are_other_columns(tmp_path):
    stamped(tmp_path, "a", "f", data_fp="d1")
    stamped(tmp_path, "b", "f", data_fp="d2", seed=2)
    stamped(tmp_path, "c", "f", version=2, seed=3)
    stamped(tmp_path, "d", "f", version=None, seed=4)  # written before records held fingerprints
    stamped(tmp_path, "e", "f", seed=5, extra=("task.max_length=64",))
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert len(group.tasks) == 5 and all(t.startswith("tnews · ") for t in group.tasks)
    (row,) = group.rows.values()
    assert all(len(row.cells[t].scores) == 1 for t in group.tasks)  # nothing pooled
    names = " | ".join(group.tasks)
    assert "older records" in names and "task v2" in names and "max_length=64" in names
    data = {t.split("data ")[1] for t in group.tasks if "data " in t}
    assert len(data) == 2  # the two files, told apart by their fingerprints
    head, _ = leaderboard.table(group)
    assert sum(h.startswith("tnews · ") for h in head) == 5


def test_a_cell_pooling_library_versions_gets_a_footnote_and_strict_refuses_it(tmp_path):
    stamped(tmp_path, "a", "f", env={**ENV, "transformers": "5.0.0", "peftbench": "0.9.0"})
    stamped(tmp_path, "b", "f", seed=2, env={**ENV, "transformers": "5.1.0", "peftbench": "0.9.0"})
    files, _ = leaderboard.write([tmp_path], tmp_path / "board")
    page = (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")
    assert "Cells pooling runs of other versions or CPU kernels:" in page and "transformers 5.0.0, 5.1.0" in page
    assert "peftbench 0.9.0" not in page  # the same everywhere: not named
    with pytest.raises(PeftbenchError, match=r"transformers 5.0.0, 5.1.0 \(--strict\)"):
        leaderboard.write([tmp_path], tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()


def test_a_cell_pooling_cpus_of_other_kernels_under_one_name_gets_a_footnote(tmp_path):
    """"AMD EPYC" names CPUs with and without AVX-512: the kernels torch ran are recorded, and a cell mixing
    them says so; a record from before the field says nothing either way."""
    stamped(tmp_path, "a", "f", env={**ENV, "cpu_capability": "AVX512"})
    stamped(tmp_path, "c", "f", seed=3, env=ENV)
    leaderboard.write([tmp_path], tmp_path / "board")
    assert "pools runs" not in (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")
    stamped(tmp_path, "b", "f", seed=2, env={**ENV, "cpu_capability": "AVX2"})
    leaderboard.write([tmp_path], tmp_path / "board")
    page = (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")
    assert "pools runs of cpu_capability AVX2, AVX512" in page and "AVX512, None" not in page
    assert environment()["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""


def test_leaderboard_json_holds_every_cell_and_the_sources(tmp_path):
    for seed in (1, 2, 3):
        stamped(tmp_path / "machine-a", f"r{seed}", "f", seed=seed, acc=0.5 + seed / 100)
    stamped(tmp_path / "machine-b", "other", "f", seed=1, task="afqmc")
    leaderboard.write([tmp_path / "machine-a", tmp_path / "machine-b"], tmp_path / "board")
    page = json.loads((tmp_path / "board" / "leaderboard.json").read_text(encoding="utf-8"))
    assert page["schema"] == 1 and page["records"] == 4
    assert [(s["folder"].split("/")[-1], s["records"], s["hardware"]) for s in page["sources"]] == [
        ("machine-a", 3, ["Test GPU ×1"]), ("machine-b", 1, ["Test GPU ×1"])]
    (table,) = page["tables"]
    assert table["backbone_fingerprint"] == "f" * 8 and table["columns"] == ["afqmc", "tnews"]
    tnews = next(c for c in table["cells"] if c["column"] == "tnews")
    assert tnews["seeds"] == [1, 2, 3] and tnews["n"] == 3 and len(tnews["run_ids"]) == 3
    assert tnews["mean"] == pytest.approx(statistics.fmean(tnews["scores"]))
    assert tnews["task_identity"]["version"] == 1 and tnews["data_fingerprints"]["train"]["sha256"] == "d1"
    (row,) = table["rows"]
    assert row["row"] == tnews["row"] and row["trainable"] == 10_000 and row["train_samples_per_s"] == 200.0
    assert table["baselines"]["tnews"] == BASELINES["tnews"] and table["title"].startswith("zh-mini")
    md_page = (tmp_path / "board" / "leaderboard.md").read_text(encoding="utf-8")
    assert "Sources: " in md_page and "machine-b (1 records on Test GPU ×1" in md_page


def test_model_index_holds_every_row_and_the_hub_parser_reads_its_cell_means(tmp_path):
    from huggingface_hub.repocard_data import model_index_to_eval_results

    for seed in (1, 2):
        stamped(tmp_path / "runs", f"t{seed}", "f", seed=seed, acc=0.5 + seed / 100)
        stamped(tmp_path / "runs", f"a{seed}", "f", seed=seed, acc=0.7 + seed / 100, task="afqmc", method="full")
    from peftbench.cli import main

    assert main(["leaderboard", str(tmp_path / "runs"), "--out", str(tmp_path / "board"), "--model-index"]) == 0
    page = json.loads((tmp_path / "board" / "leaderboard.json").read_text(encoding="utf-8"))
    index = yaml.safe_load((tmp_path / "board" / "model-index.yaml").read_text(encoding="utf-8"))["model-index"]
    (table,) = page["tables"]
    expected = {(f"{c['row']} · {table['title']}", c["column"], {"dev": "validation"}.get(c["split"], c["split"])):
                c["mean"] for c in table["cells"]}
    assert len(index) == len(table["rows"]) == 2 and len(expected) == 2
    got = {}
    for entry in index:
        name, results = model_index_to_eval_results([entry])
        got |= {(name, r.dataset_name, r.dataset_split): r.metric_value for r in results}
        assert {(r.task_type, r.metric_type) for r in results} == {("text-classification", "accuracy")}
    assert got == expected
    leaderboard.write([tmp_path / "runs"], tmp_path / "plain")
    assert not (tmp_path / "plain" / "model-index.yaml").exists()



def test_a_backbone_fingerprint_follows_the_files_not_the_seed_or_how_it_loads(tmp_path):
    from peftbench import checkpoint, models

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "README.md").write_text("a model card", encoding="utf-8")
    first = checkpoint.backbone_fingerprint(str(folder), None, False)
    (folder / "README.md").write_text("another card", encoding="utf-8")
    assert checkpoint.backbone_fingerprint(str(folder), None, False) == first  # not what the model is
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert checkpoint.backbone_fingerprint(str(folder), None, False) != first  # retrained into the same folder
    tiny = checkpoint.backbone_fingerprint("tiny", models.random_init_architecture("tiny"), True)
    assert tiny != checkpoint.backbone_fingerprint("random:mini", models.random_init_architecture("random:mini"), True)
    assert tiny == checkpoint.backbone_fingerprint("tiny", models.random_init_architecture("tiny"), True)


def test_a_task_fingerprints_the_bytes_of_each_split_it_reads(tmp_path):
    import hashlib

    from conftest import fewclue_dir

    from peftbench.tasks import load_task

    rows = [{"sentence": "好", "label": "Positive", "id": i} for i in range(4)]
    folder = fewclue_dir(tmp_path / "eprstmt", rows, rows)
    data = load_task(config.load(None, ["task.name=eprstmt", f"task.data_dir={folder}"]).task)
    train = folder / "train_few_all.json"
    assert data.fingerprints["train"] == {"file": train.name, "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}
    assert set(data.fingerprints) == {"train", "dev"} and data.spec.version == 1


def test_a_run_that_failed_before_loading_joins_its_backbones_table_and_one_model_at_two_paths_is_one_row(tmp_path):
    stamped(tmp_path, "ok", "f", seed=1, acc=0.6)
    stamped(tmp_path, "ok2", "f", seed=2, acc=0.62)
    failed = record(tmp_path / "oom", "runs/pretrain/zh-mini/model", "lora", "tnews", 3, 0, status="failed",
                    error="OutOfMemoryError: CUDA out of memory")  # no fingerprints: it failed while loading
    assert "fingerprint" not in failed["backbone"] and "data" not in failed
    moved = stamped(tmp_path, "moved", "f", seed=4, acc=0.64)  # the same files, copied to another folder
    moved["config"]["model"]["name_or_path"] = moved["backbone"]["name_or_path"] = "leaderboards/zh-mini"
    write_atomic(next((tmp_path / "moved").rglob("record.json")), moved)
    (group,) = leaderboard.build(leaderboard.collect([tmp_path])[0])
    assert group.tasks == ["tnews"] and group.older_note is None
    (row,) = group.rows.values()
    assert len(row.cells["tnews"].scores) == 3 and row.cells["tnews"].failures == ["OOM"]
