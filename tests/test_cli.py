import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftbench.cli import main
from peftbench.tasks.synthetic import write_files

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
USER_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TOKENIZERS_PARALLELISM")}  # as typed


def cli(*args, cwd=None, env=ENV):
    return subprocess.run([sys.executable, "-m", "peftbench", *args], capture_output=True, text=True, cwd=cwd, env=env)


def messages(stderr: str, bars: tuple[str, ...] = ()) -> list[str]:
    """What stderr says besides progress bars (tqdm redraws a line with carriage returns)."""
    pieces = (piece.strip() for line in stderr.splitlines() for piece in line.split("\r"))
    return [piece for piece in pieces if piece and not piece.startswith(bars)]


PROBE = """
import sys
from peftbench.cli import main
try:
    main(sys.argv[1:])
except SystemExit:  # --help
    pass
heavy = [m for m in ("transformers", "peft", "bitsandbytes", "datasets", "sklearn", "accelerate") if m in sys.modules]
if heavy:
    sys.stderr.write(f"imported {heavy}\\n")
"""


@pytest.mark.parametrize("args", [["tasks"], ["methods"], ["--help"], ["run", "--help"]])
def test_listing_commands_are_quiet_and_import_no_heavy_library(args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=USER_ENV)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout, proc.stderr


def test_a_leaderboard_reads_records_without_the_model_libraries(tmp_path):
    """``peftbench leaderboard`` starts without transformers, PEFT or datasets (seconds of imports it needs not)."""
    records = Path(__file__).resolve().parents[1] / "leaderboards" / "prefix-study" / "records"
    proc = subprocess.run([sys.executable, "-c", PROBE, "leaderboard", str(records), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=USER_ENV)
    assert proc.returncode == 0 and "imported [" not in proc.stderr, proc.stderr  # (matplotlib may warn: allowed)
    assert (tmp_path / "leaderboard.md").is_file() and "wrote" in proc.stdout


def test_help_lists_every_key_with_type_default_and_meaning(capsys):
    from peftbench import config
    from peftbench.methods import get_method, method_names
    from peftbench.pretrain import PretrainConfig

    def shown(*args):
        with pytest.raises(SystemExit):
            main([*args, "--help"])
        return capsys.readouterr().out

    run_help = shown("run")
    rows = config.key_help(config.RunConfig)
    for name in method_names():
        rows += [r for r in config.key_help(get_method(name).Config, "method.") if r[0] != "method.name"]
        assert f"method.name={name} (docs/methods/{name}.md):" in run_help
    pretrain_help = shown("pretrain")
    for text, table in ((run_help, rows), (pretrain_help, config.key_help(PretrainConfig))):
        for key, kind, default, meaning in table:
            assert meaning, f"{key} has no description (a comment on its dataclass field)"
            assert any(line.split()[:1] == [key] and kind in line and meaning in line for line in text.splitlines())
    assert "train.report_to" in run_help and "docs/recipes.md" in run_help


@pytest.mark.parametrize("args, message", [
    (["train.epochs=x"], "error: config key 'train.epochs' must be int, got 'x'"),
    (["method.name=lora", "method.rank=3"], "error: unknown config key 'method.rank'"),
    (["nope.yaml"], "error: nope.yaml: recipe file not found"),
])
def test_bad_input_is_one_error_line_exit_2_and_no_record(tmp_path, capsys, args, message):
    assert main(["run", *args, f"output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_missing_data_dir_and_model_path_fail_cleanly(tmp_path, capsys):
    assert main(["run", "method.name=lora", "task.name=eprstmt", f"task.data_dir={tmp_path}/none",
                 f"output_dir={tmp_path}/a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}/none: data directory not found (config key 'task.data_dir')"
    data = write_files(tmp_path / "syn")
    assert main(["run", "method.name=lora", f"task.data_dir={data}", f"model.name_or_path={tmp_path}/nomodel",
                 f"output_dir={tmp_path}/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: config key 'model.name_or_path': directory not found: {tmp_path}/nomodel"
    for run_dir in ("a", "b"):  # bad input: no record, no folder (docs/reliability.md)
        assert not (tmp_path / run_dir).exists()


@pytest.mark.slow
def test_recipe_run_on_clue_layout_files(tmp_path, capsys):
    data = write_files(tmp_path / "data", layout="clue")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: {{name: synthetic, data_dir: {data}, max_length: 48}}\nmethod: {{name: lora}}\n"
                      f"train: {{epochs: 1, lr: 5e-3, measure_inference: false}}\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["run", str(recipe), "train.max_steps=40"]) == 0  # more than the one epoch (32 steps) asked for
    assert "backbone: tiny, random init (no model.name_or_path given)" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert rec["total_steps"] == 40 and rec["metrics"]["stopped_by"] == "max_steps"  # max_steps sets the budget
    assert [h["epoch"] for h in rec["dev_history"]] == [1, 2]
    assert "test_accuracy" not in rec["metrics"]  # CLUE test.json is unlabeled
    assert rec["config"]["task"]["data_dir"] == str(data)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """As a user runs it (warnings on): stderr holds the two progress bars and nothing else; stdout a line per
    epoch and the closing table with the backbone."""
    proc = cli("run", cwd=tmp_path, env=USER_ENV)
    assert proc.returncode == 0, proc.stderr
    assert messages(proc.stderr, bars=("synthetic/full:", "synthetic/lora:")) == []
    for method in ("full", "lora"):
        epochs = [line for line in proc.stdout.splitlines() if line.startswith(f"synthetic/{method} epoch ")]
        assert [line.split()[2] for line in epochs] == [f"{e}/4" for e in range(1, 5)]
        assert all(" dev accuracy " in line and " samples/s, " in line for line in epochs)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| synthetic")]
    assert [line.split("|")[2].strip() for line in lines] == ["full", "lora"]
    assert all(line.split("|")[3].strip() == "tiny (random init)" for line in lines)
    for method in ("full", "lora"):
        rec = json.loads((tmp_path / "runs" / "demo" / method / "record.json").read_text())
        assert rec["status"] == "success" and rec["metrics"]["accuracy"] > 0.6  # chance is 0.25


@pytest.mark.parametrize("command", ["predict", "ensemble"])
@pytest.mark.parametrize("size, why", [("0", "must be >= 1, got 0"), ("-1", "must be >= 1, got -1"),
                                       ("many", "expected a whole number, got 'many'")])
def test_a_batch_size_below_one_is_refused_by_the_option(command, size, why, tmp_path, capsys):
    """Not a traceback (0) or an empty predictions file reported as written (-1)."""
    with pytest.raises(SystemExit) as stopped:
        main([command, str(tmp_path), "--batch-size", size, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and f"argument --batch-size: {why}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
