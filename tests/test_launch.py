"""Runs started the way docs/distributed.md tells users to: ``accelerate launch`` with two CPU processes (DDP; a sweep
of a float and an 8-bit base) and across two machines on the loopback address. Each evaluates every example once,
says how it ran, and trains as one process does (loss curve within 1e-5). The FSDP config is launched the same way
in tests/test_fsdp.py."""

import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import accelerate_launch, same_steps
from safetensors.torch import load_file

from peftbench import config
from peftbench.records import read_record
from peftbench.train import run

pytestmark = pytest.mark.slow  # each starts two Python processes that train
LORA = ["method.dropout=0", "train.lr=5e-3"]
INT8 = ["model.quantization=8bit"]


@pytest.fixture(scope="module")
def one_process(still_tiny, tmp_path_factory):
    """The references: LoRA in one process, two micro-batches a step, on the float and on the 8-bit base."""
    out = tmp_path_factory.mktemp("one")
    return {quantization: run(config.load(None, same_steps(still_tiny, "lora", *LORA, *extra,
                                                           "train.grad_accum_steps=2", "train.evaluate_test=true",
                                                           f"output_dir={out / quantization}"))).record
            for quantization, extra in (("none", []), ("8bit", INT8))}


def assert_trains_as_one(record, one, engine, processes=2, machines=1):
    assert (record["env"]["engine"], record["env"]["num_processes"], record["env"]["num_machines"]) == \
        (engine, processes, machines)
    assert len(record["metrics"]["peak_memory_mb_per_process"]) == processes
    assert record["metrics"]["n_eval"] == one["metrics"]["n_eval"] == 300  # every dev example exactly once
    assert [p["step"] for p in record["loss_curve"]] == [p["step"] for p in one["loss_curve"]]
    for a, b in zip(one["loss_curve"], record["loss_curve"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (one["loss_curve"], record["loss_curve"])
    assert abs(record["metrics"]["score"] - one["metrics"]["score"]) <= 1 / 300  # at most one prediction flips
    saved = [load_file(str(Path(r["checkpoint"]) / "adapter_model.safetensors")) for r in (one, record)]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[0]:
        torch.testing.assert_close(saved[1][key], saved[0][key], atol=1e-5, rtol=0, msg=key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_sweep_a_float_and_an_8bit_base(still_tiny, one_process, tmp_path):
    """The main process claims each cell, every process runs it; each holds its own copy of a quantised base."""
    sweep = tmp_path / "sweep.yaml"
    recipe = config.parse_overrides(same_steps(still_tiny, "lora", *LORA, "train.evaluate_test=true"))
    sweep.write_text(yaml.safe_dump({"recipe": recipe, "grid": {"model.quantization": ["none", "8bit"]},
                                     "output_dir": str(tmp_path / "results")}), encoding="utf-8")
    proc = accelerate_launch("--multi_gpu", "--num_processes", "2", "-m", "peftbench", "sweep", str(sweep))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "sweep: 2 cells, ran 2, done before 0, claimed elsewhere 0, failed 0"
    records = {r["config"]["model"]["quantization"]: r
               for r in map(read_record, (tmp_path / "results").glob("*/record.json"))}
    assert set(records) == {"none", "8bit"}
    for quantization, record in records.items():
        assert_trains_as_one(record, one_process[quantization], "ddp")
        assert record["metrics"]["test_n_eval"] == 300
    assert records["8bit"]["precision"]["quantization"] == "8bit"
    assert not list((tmp_path / "results").rglob("*.tmp")) and not list((tmp_path / "results" / ".claims").iterdir())


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
    assert_trains_as_one(read_record(tmp_path / "two" / "record.json"), one_process["none"], "ddp", 2, 2)
