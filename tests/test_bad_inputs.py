"""A corpus of bad inputs: each is refused with exit code != 0, one error line naming the file, line or key,
no traceback, and no success record."""

from pathlib import Path

import pytest

from peftbench.cli import main

EPR = '{"sentence": "很好", "label": "Positive"}'
EPR2 = '{"sentence": "不好", "label": "Negative"}'


def fewclue(root: Path, train=(EPR, EPR2), dev=(EPR, EPR2), test=None, raw: dict | None = None) -> Path:
    """An eprstmt-style FewCLUE folder; ``raw`` maps a file name to bytes written as they are."""
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in (("train_few_all.json", train), ("dev_few_all.json", dev), ("test_public.json", test)):
        if lines is not None:
            (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for name, data in (raw or {}).items():
        (root / name).write_bytes(data)
    return root


def run_args(*overrides):
    return lambda tmp: ["run", "method.name=lora", *overrides, f"output_dir={tmp}/out"]


def data_args(expected_file, *overrides, **layout):
    """A run of eprstmt on a generated folder."""
    def build(tmp):
        data = fewclue(tmp / "data", **layout)
        return ["run", "method.name=lora", "task.name=eprstmt", f"task.data_dir={data}", *overrides,
                f"output_dir={tmp}/out"]
    return build


def recipe_args(text: bytes):
    def build(tmp):
        path = tmp / "recipe.yaml"
        path.write_bytes(text)
        return ["run", str(path), f"output_dir={tmp}/out"]
    return build


def custom_args(files: dict, *overrides):
    def build(tmp):
        root = tmp / "data"
        root.mkdir()
        for name, text in files.items():
            (root / name).write_text(text, encoding="utf-8")
        return ["run", "method.name=lora", f"task.data_dir={root}", *overrides, f"output_dir={tmp}/out"]
    return build


def pretrain_args(*overrides, corpus=True):
    def build(tmp):
        files = []
        if corpus:
            (tmp / "corpus.txt").write_text("今天天气很好\n" * 50, encoding="utf-8")
            files = [f"corpus.files=[{tmp / 'corpus.txt'}]"]
        return ["pretrain", *files, "model.from_scratch=true", *overrides, f"output_dir={tmp}/pt"]
    return build


def sweep_args(text: str, *extra):
    def build(tmp):
        path = tmp / "sweep.yaml"
        path.write_text(text.format(out=tmp / "out"), encoding="utf-8")
        return ["sweep", str(path), *extra]
    return build


def foreign_output_dir(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my notes", encoding="utf-8")
    return ["run", "method.name=lora", "train.max_steps=1", f"output_dir={tmp}/mine"]


def file_output_dir(tmp):
    (tmp / "afile").write_text("x", encoding="utf-8")
    return ["run", "method.name=lora", "train.max_steps=1", f"output_dir={tmp}/afile"]


def not_a_checkpoint(tmp):
    (tmp / "ck").mkdir()
    return ["predict", str(tmp / "ck"), "--out", str(tmp / "p.jsonl")]


def earlier_checkpoint(tmp):
    (tmp / "ck").mkdir()
    (tmp / "ck" / "peftbench.json").write_text('{"method": "lora", "task": "synthetic", "kind": "classification", '
                                               '"labels": ["0"], "label_names": ["a"], "model_labels": ["a"], '
                                               '"base_model": "bert-base-chinese", "config": {}}', encoding="utf-8")
    return ["predict", str(tmp / "ck"), "--out", str(tmp / "p.jsonl")]


def no_records(tmp):
    (tmp / "empty").mkdir()
    return ["leaderboard", str(tmp / "empty"), "--out", str(tmp / "lb")]


ALIAS_BOMB = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n".encode() for p, k in zip("abcdefgh", "bcdefghi")) + \
    b"method: {name: lora, target_modules: [*i, *i, *i, *i, *i, *i, *i, *i, *i]}\n"  # 9^9 values, 400 bytes
VALUES = list(range(8, 108))
HUGE_GRID = (f"grid: {{{{train.seed: {VALUES}, train.epochs: {VALUES}, task.max_length: {VALUES}}}}}\n"
             "output_dir: {out}\n")  # 10^6 cells


def root_output_dir(tmp):
    return ["run", "method.name=lora", "output_dir=/"]


BAD = {
    # --- values out of range, named by key
    "lr negative": (run_args("train.lr=-1"), "'train.lr' must be a finite number > 0"),
    "lr zero": (run_args("train.lr=0"), "'train.lr' must be a finite number > 0"),
    "lr nan": (run_args("train.lr=.nan"), "'train.lr' must be a finite number > 0"),
    "lr inf": (run_args("train.lr=.inf"), "'train.lr' must be a finite number > 0"),
    "max_steps negative": (run_args("train.max_steps=-5"), "'train.max_steps' must be -1 (no limit) or >= 1"),
    "max_steps zero": (run_args("train.max_steps=0"), "'train.max_steps' must be -1"),
    "batch_size 0": (run_args("train.batch_size=0"), "'train.batch_size' must be >= 1"),
    "eval_batch_size 0": (run_args("train.eval_batch_size=0"), "'train.eval_batch_size' must be >= 1"),
    "grad_accum 0": (run_args("train.grad_accum_steps=0"), "'train.grad_accum_steps' must be >= 1"),
    "epochs 0": (run_args("train.epochs=0"), "'train.epochs' must be >= 1"),
    "warmup above 1": (run_args("train.warmup_ratio=1.5"), "'train.warmup_ratio' must be in [0, 1)"),
    "warmup negative": (run_args("train.warmup_ratio=-0.1"), "'train.warmup_ratio' must be in [0, 1)"),
    "weight_decay negative": (run_args("train.weight_decay=-0.01"), "'train.weight_decay' must be a finite number"),
    "max_grad_norm negative": (run_args("train.max_grad_norm=-1"), "'train.max_grad_norm' must be a finite number"),
    "seed negative": (run_args("train.seed=-1"), "'train.seed' must be >= 0"),
    "log_every 0": (run_args("train.log_every=0"), "'train.log_every' must be >= 1"),
    "mixed_precision": (run_args("train.mixed_precision=fp8"), "'train.mixed_precision' must be one of"),
    "timing warm-up negative": (run_args("train.timing_warmup_steps=-1"), "'train.timing_warmup_steps' must be >= 0"),
    "max_train_samples 0": (run_args("task.max_train_samples=0"), "'task.max_train_samples' must be null (all) or"),
    "max_train_samples negative": (run_args("task.max_train_samples=-3"), "'task.max_train_samples'"),
    "max_length tiny": (run_args("task.max_length=4"), "'task.max_length' must be >= 8"),
    "max_length above positions": (run_args("task.max_length=100000"),
                                   "'task.max_length' must be <= 512 (the backbone's max_position_embeddings)"),
    "lora r 0": (run_args("method.r=0"), "'method.r' must be >= 1"),
    "lora dropout 1.5": (run_args("method.dropout=1.5"), "'method.dropout' must be in [0, 1)"),
    "lora dropout negative": (run_args("method.dropout=-0.1"), "'method.dropout' must be in [0, 1)"),
    "lora alpha 0": (run_args("method.alpha=0"), "'method.alpha' must be > 0"),
    "lora targets nothing": (run_args("method.target_modules=[nothing_here]"), "config key 'method.target_modules'"),
    "adalora init_r 0": (run_args("method.name=adalora", "method.init_r=0"), "'method.init_r' must be >= 1"),
    "adalora target above init": (run_args("method.name=adalora", "method.target_r=20"), "'method.target_r' (20)"),
    "adalora dropout 1": (run_args("method.name=adalora", "method.dropout=1"), "'method.dropout' must be in [0, 1)"),
    "adapter bottleneck 0": (run_args("method.name=adapter", "method.bottleneck=0"), "'method.bottleneck'"),
    "adapter reduction 0": (run_args("method.name=adapter", "method.reduction_factor=0"), "'method.reduction_factor'"),
    "adapter variant": (run_args("method.name=adapter", "method.variant=foo"), "'method.variant' must be one of"),
    "adapter targets nothing": (run_args("method.name=adapter", "method.ffn_modules=[nothing]"),
                                "set config key 'method.ffn_modules'"),
    "prefix tokens 0": (run_args("method.name=prefix", "method.num_virtual_tokens=0"), "'method.num_virtual_tokens'"),
    "prompt tokens 0": (run_args("method.name=prompt", "method.num_virtual_tokens=0"), "'method.num_virtual_tokens'"),
    # --- names, keys and types
    "unknown method": (run_args("method.name=nosuch"), "config key 'method.name': unknown method 'nosuch'"),
    "unknown task": (run_args("task.name=nosuch"), "config key 'task.name': unknown task 'nosuch'"),
    "unknown key": (run_args("train.lrr=1"), "unknown config key 'train.lrr'"),
    "lr not a number": (run_args("train.lr=abc"), "config key 'train.lr' must be float"),
    "epochs a float": (run_args("train.epochs=1.5"), "config key 'train.epochs' must be int"),
    "override without =": (run_args("train.lr"), "override 'train.lr' is not of the form key=value"),
    "quantization": (run_args("model.quantization=int4"), "config key 'model.quantization' must be one of"),
    "full on 8bit": (run_args("method.name=full", "model.quantization=8bit"), "'model.quantization=8bit' conflict"),
    "labels on a CLUE task": (run_args("task.name=tnews", "task.labels=[a]"), "config key 'task.labels' applies only"),
    "tag scheme on classification": (run_args("task.tag_scheme=bioes"), "config key 'task.tag_scheme' applies only"),
    "model dir missing": (run_args("model.name_or_path=./no/such/dir"), "config key 'model.name_or_path'"),
    # --- recipe files
    "recipe missing": (lambda tmp: ["run", str(tmp / "none.yaml")], "none.yaml: recipe file not found"),
    "recipe bad YAML": (recipe_args(b"train:\n  lr: [1\n"), "recipe.yaml:3: invalid YAML"),
    "recipe duplicate key": (recipe_args(b"train:\n  lr: 1e-3\n  lr: 2e-3\n"), "recipe.yaml:3: invalid YAML (key 'lr'"),
    "recipe a list": (recipe_args(b"- a\n- b\n"), "recipe.yaml: a recipe must be a mapping"),
    "recipe not UTF-8": (recipe_args(b"train:\n  lr: 1e-3 # \xff\xfe\n"), "recipe.yaml: not UTF-8 text"),
    # --- data files
    "data dir missing": (lambda tmp: run_args("task.name=eprstmt", f"task.data_dir={tmp}/none")(tmp),
                         "none: data directory not found (config key 'task.data_dir')"),
    "no dev file": (data_args(None, dev=None), "has train_few_all.json but no dev_few_all.json"),
    "malformed JSON": (data_args(None, train=(EPR, '{"sentence": "x", "label": ')),
                       "train_few_all.json:2: malformed JSON"),
    "record not an object": (data_args(None, train=(EPR, "[1, 2]")), "train_few_all.json:2: expected a JSON object"),
    "not UTF-8": (data_args(None, train=None, raw={"train_few_all.json": (EPR + "\n" + EPR2 + "\n").encode()
                                                   + b'{"sentence": "\xe4\xb8", "label": "Positive"}\n'}),
                  "train_few_all.json:3: not UTF-8 text (byte 0xe4)"),
    "label missing": (data_args(None, train=(EPR, '{"sentence": "x"}')), "train_few_all.json:2: field 'label' missing"),
    "unknown label": (data_args(None, dev=(EPR, '{"sentence": "x", "label": "Meh"}')),
                      "dev_few_all.json:2: field 'label': label 'Meh' is not a label of task 'eprstmt'"),
    "text not a string": (data_args(None, train=('{"sentence": 5, "label": "Positive"}',)),
                          "train_few_all.json:1: field 'sentence' must be a string"),
    "text field missing": (data_args(None, train=('{"text": "x", "label": "Positive"}',)),
                           "train_few_all.json:1: field 'sentence' missing"),
    "empty dev": (data_args(None, dev=("  ", "")), "dev_few_all.json: split 'dev' is empty"),
    "empty test": (data_args(None, test=()), "test_public.json: split 'test' is empty"),
    "test partly labeled": (data_args(None, test=(EPR, '{"sentence": "x"}')), "1 of 2 records have no label"),
    "custom without text_fields": (custom_args({"train.json": EPR + "\n", "dev.json": EPR + "\n"}, "task.name=custom",
                                               "task.labels=[Positive]"), "config key 'task.text_fields'"),
    "custom duplicate labels": (custom_args({"train.json": EPR + "\n", "dev.json": EPR + "\n"}, "task.name=custom",
                                            "task.text_fields=[sentence]", "task.labels=[a, a]"),
                                "config key 'task.labels' has duplicate labels"),
    "CSV row missing label": (custom_args({"train.csv": 'text,label\n"a\nb",0\n\nlonely\n',
                                           "dev.csv": "text,label\nx,0\n"},
                                          "task.name=custom", "task.text_fields=[text]", "task.labels=['0','1']"),
                              "train.csv:5: field 'label' missing"),  # physical line: a record spans two, a blank
    "NER span outside": (custom_args({"train.json": '{"text": "张伟", "label": {"per": {"张伟": [[0, 5]]}}}\n',
                                      "dev.json": '{"text": "张伟", "label": {"per": {"张伟": [[0, 1]]}}}\n'},
                                     "task.name=custom_ner", "task.labels=[per]"), "train.json:1: field 'label.per'"),
    "NER text mismatch": (custom_args({"train.json": '{"text": "张伟", "label": {"per": {"李": [[0, 0]]}}}\n',
                                       "dev.json": '{"text": "张伟", "label": {"per": {"张伟": [[0, 1]]}}}\n'},
                                      "task.name=custom_ner", "task.labels=[per]"), "does not match the text"),
    "CoNLL bad tag": (custom_args({"train.txt": "张 B-per\n伟 X-per\n", "dev.txt": "张 O\n"},
                                  "task.name=custom_ner", "task.labels=[per]"), "train.txt:2: tag 'X-per'"),
    "CoNLL line without its tag": (custom_args({"train.txt": "张 B-per\n伟 I-per\n好\n", "dev.txt": "张 O\n"},
                                               "task.name=custom_ner", "task.labels=[per]"),
                                   "train.txt:3: some lines of this sentence have a tag, others not"),
    "CoNLL sentence without tags": (custom_args({"train.txt": "张 B-per\n伟 I-per\n\n北\n京\n", "dev.txt": "张 O\n"},
                                                "task.name=custom_ner", "task.labels=[per]"),
                                    "train.txt:4: this sentence has no tags, the ones before it do"),
    # --- output folders
    "output_dir holds other files": (foreign_output_dir, "holds 'notes.txt', which is not part of a peftbench run"),
    "output_dir is a file": (file_output_dir, "afile is a file, not a folder"),
    # --- other commands
    "predict not a checkpoint": (not_a_checkpoint, "not a peftbench checkpoint (peftbench.json missing)"),
    "predict an earlier checkpoint": (earlier_checkpoint, "peftbench.json: field 'base' missing: a checkpoint of an "
                                                          "earlier peftbench"),
    "leaderboard without records": (no_records, "no record.json under"),
    "sweep unknown key": (sweep_args("grid: {{train.seed: [1]}}\nnope: 1\noutput_dir: {out}\n"),
                          "sweep.yaml: unknown sweep key 'nope'"),
    "sweep grid not a list": (sweep_args("grid: {{train.seed: 1}}\noutput_dir: {out}\n"),
                              "field 'grid.train.seed' must be a non-empty list"),
    "sweep bad shard": (sweep_args("grid: {{train.seed: [1]}}\noutput_dir: {out}\n", "--shard", "3/2"),
                        "--shard 3/2: need 0 <= i < N"),
    "pretrain corpus missing": (lambda tmp: ["pretrain", f"corpus.files=[{tmp}/none.txt]", "model.from_scratch=true",
                                             f"output_dir={tmp}/pt"], "config key 'corpus.files': file not found"),
    "pretrain mask probability": (pretrain_args("mask.probability=1.5"), "'mask.probability' must be in (0, 1)"),
    "pretrain minutes negative": (pretrain_args("train.max_minutes=-1"), "'train.max_minutes' must be a finite"),
    "pretrain lr nan": (pretrain_args("train.lr=.nan"), "'train.lr' must be a finite number > 0"),
    "pretrain max_steps -1": (pretrain_args("train.max_steps=-1"), "'train.max_steps' must be >= 1"),
    "recipe alias bomb": (recipe_args(ALIAS_BOMB), "invalid YAML (its aliases expand to more than 100,000 values)"),
    "sweep of a million cells": (sweep_args(HUGE_GRID), "field 'grid' has 1,000,000 cells (100 x 100 x 100), more "
                                                        "than 10,000"),
    "output_dir the root": (root_output_dir, "config key 'output_dir': / is the root folder"),
    "task name a path": (run_args("task.name=../../etc"), "config key 'task.name': unknown task '../../etc'"),
    "pretrain eval text": (lambda tmp: pretrain_args(corpus=False)(tmp) + [f"corpus.files=[{fewclue(tmp / 'd')}/"
                                                                           "dev_few_all.json]"],
                           "dev_few_all.json: named like a task's dev/test file"),
}


def test_the_corpus_is_large():
    assert len(BAD) >= 60


def test_debug_mode_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_DEBUG", "1")
    assert main(run_args("train.lr=-1")(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: config key 'train.lr'")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_with_one_line(case, tmp_path, capsys):
    build, expected = BAD[case]
    argv = build(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*record.json"))  # bad input writes no record (docs/reliability.md)
    assert not [p for p in Path("/").iterdir() if p.name.startswith(".") and p.name.endswith(".staging")]


def test_a_huge_value_is_quoted_short(tmp_path, capsys):
    assert main(run_args("train.lr=" + "x" * 1_000_000)(tmp_path)) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: config key 'train.lr' must be") and "(1,000,002 characters)" in line
    assert len(line) < 500


def test_a_sweep_prints_its_cell_count_before_anything(tmp_path, capsys):
    assert main(sweep_args(HUGE_GRID, "--dry-run")(tmp_path)) == 2
    out, err = capsys.readouterr()
    assert "1,000,000 grid cells" in out and "--max-cells" in err


def test_max_cells_sets_the_limit_both_ways(tmp_path, capsys):
    """A 3-cell grid: refused under ``--max-cells 2``, listed under ``--max-cells 3``."""
    grid = "grid: {{train.seed: [1, 2, 3]}}\noutput_dir: {out}\n"
    assert main(sweep_args(grid, "--dry-run", "--max-cells", "2")(tmp_path)) == 2
    assert "field 'grid' has 3 cells (3), more than 2;" in capsys.readouterr().err
    assert main(sweep_args(grid, "--dry-run", "--max-cells", "3")(tmp_path)) == 0
    assert capsys.readouterr().out.count("to do") == 3


def test_an_alias_bomb_in_an_override_is_refused(tmp_path, capsys):
    levels = ["&a [x, x, x, x, x, x, x, x, x]"] + [f"&{k} [{', '.join(['*' + p] * 9)}]"
                                                   for p, k in zip("abcdefgh", "bcdefghi")]
    assert main(run_args(f"method.target_modules=[{', '.join(levels)}]")(tmp_path)) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: override 'method.target_modules=") and "expand to more than 100,000" in line
