"""Runs started the way docs/distributed.md tells users to: ``accelerate launch`` with two CPU processes (DDP), with
the FSDP config (FSDP2 applied by peftbench), across two machines on the loopback address, and a sweep. Each
evaluates every example once, says how it ran, and trains as one process does (loss curve within 1e-5)."""

import socket
from pathlib import Path

import pytest
import yaml
from conftest import accelerate_launch, same_steps

from peftbench import config
from peftbench.records import read_record
from peftbench.train import run

pytestmark = pytest.mark.slow  # each starts two Python processes that train
FSDP_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp.yaml"
LORA = ["method.dropout=0", "train.lr=5e-3"]


@pytest.fixture(scope="module")
def one_process(still_tiny, tmp_path_factory):
    """The reference: LoRA in one process, two micro-batches a step."""
    out = tmp_path_factory.mktemp("one") / "run"
    return run(config.load(None, same_steps(still_tiny, "lora", *LORA, "train.grad_accum_steps=2",
                                            f"output_dir={out}"))).record


def assert_trains_as_one(record, one, engine, processes=2, machines=1):
    assert (record["env"]["engine"], record["env"]["num_processes"], record["env"]["num_machines"]) == \
        (engine, processes, machines)
    assert record["metrics"]["n_eval"] == one["metrics"]["n_eval"] == 300  # every dev example exactly once
    assert [p["step"] for p in record["loss_curve"]] == [p["step"] for p in one["loss_curve"]]
    for a, b in zip(one["loss_curve"], record["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (one["loss_curve"], record["loss_curve"])
    assert abs(record["metrics"]["score"] - one["metrics"]["score"]) <= 1 / 300  # at most one prediction flips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(still_tiny, one_process, tmp_path):
    proc = accelerate_launch("--multi_gpu", "--num_processes", "2", "-m", "peftbench", "run",
                             *same_steps(still_tiny, "lora", *LORA, f"output_dir={tmp_path / 'ddp'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_trains_as_one(read_record(tmp_path / "ddp" / "record.json"), one_process, "ddp")


def test_accelerate_launch_with_the_fsdp_config(still_tiny, one_process, tmp_path):
    proc = accelerate_launch("--config_file", str(FSDP_CONFIG), "--num_processes", "2", "-m", "peftbench", "run",
                             *same_steps(still_tiny, "lora", *LORA, f"output_dir={tmp_path / 'fsdp'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = read_record(tmp_path / "fsdp" / "record.json")
    assert_trains_as_one(record, one_process, "fsdp2")
    assert record["config"]["train"]["sharding"] == "auto"  # the launch config asked for it, not the recipe


def test_two_machines_on_the_loopback_address(still_tiny, one_process, tmp_path):
    """Two ``accelerate launch`` processes, machine ranks 0 and 1, one process each, meeting at 127.0.0.1."""
    port = str(free_port())
    machines = [accelerate_launch("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                                  str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                                  "-m", "peftbench", "run",
                                  *same_steps(still_tiny, "lora", *LORA, f"output_dir={tmp_path / 'two'}"),
                                  wait=False) for rank in (0, 1)]
    for machine in machines:
        out, err = machine.communicate(timeout=600)
        assert machine.returncode == 0, err[-3000:]
    assert_trains_as_one(read_record(tmp_path / "two" / "record.json"), one_process, "ddp", 2, 2)


def test_a_sweep_under_accelerate_launch(still_tiny, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    recipe = config.parse_overrides(same_steps(still_tiny, "lora"))
    sweep.write_text(yaml.safe_dump({"recipe": recipe, "grid": {"method.name": ["lora", "bitfit"]},
                                     "output_dir": str(tmp_path / "results")}), encoding="utf-8")
    proc = accelerate_launch("--multi_gpu", "--num_processes", "2", "-m", "peftbench", "sweep", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "sweep: 2 cells, ran 2, done before 0, claimed elsewhere 0, failed 0"
    records = [read_record(p) for p in (tmp_path / "results").glob("*/record.json")]
    assert sorted(r["config"]["method"]["name"] for r in records) == ["bitfit", "lora"]
    assert all(r["env"]["num_processes"] == 2 and r["metrics"]["n_eval"] == 300 for r in records)
