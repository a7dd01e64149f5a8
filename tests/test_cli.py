import json
import os
import subprocess
import sys

import pytest

from peftbench.cli import main
from peftbench.tasks.synthetic import write_files

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peftbench", *args], capture_output=True, text=True, cwd=cwd, env=ENV)


def test_tasks_and_methods_are_listed(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("tnews", "iflytek", "afqmc", "ocnli", "cmnli", "csl", "cluewsc2020", "eprstmt", "bustm", "csldcp",
                 "custom"):
        assert f"\n{name} " in "\n" + out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "lora", "adalora", "adapter", "prefix", "prompt", "ia3", "bitfit"):
        assert f"\n{name} " in "\n" + out


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
    for run_dir in ("a", "b"):  # a failed record, never a success
        assert json.loads((tmp_path / run_dir / "record.json").read_text())["status"] == "failed"


def test_recipe_run_on_clue_layout_files(tmp_path):
    data = write_files(tmp_path / "data", layout="clue")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"task: {{name: synthetic, data_dir: {data}, max_length: 48}}\nmethod: {{name: lora}}\n"
                      f"train: {{epochs: 1, lr: 5e-3}}\noutput_dir: {tmp_path / 'out'}\n")
    proc = cli("run", str(recipe), "train.max_steps=10")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert rec["total_steps"] == 10 and "test_accuracy" not in rec["metrics"]  # CLUE test.json is unlabeled
    assert rec["config"]["task"]["data_dir"] == str(data)


def test_demo_end_to_end(tmp_path):
    proc = cli("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| synthetic")]
    assert [line.split("|")[2].strip() for line in lines] == ["full", "lora"]
    for method in ("full", "lora"):
        rec = json.loads((tmp_path / "runs" / "demo" / method / "record.json").read_text())
        assert rec["status"] == "success" and rec["metrics"]["accuracy"] > 0.6  # chance is 0.25
