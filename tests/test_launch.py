"""Runs started the way docs/distributed.md tells users to: ``accelerate launch`` with two CPU processes (DDP) and
across two machines on the loopback address, each a sweep over every method, each cell against the same run in one
process: every example evaluated once, the record says how it ran, and it trains as one process does (loss curve
and saved weights within 1e-5). The FSDP config is launched the same way in tests/test_fsdp.py."""

import socket
from pathlib import Path

import pytest
import torch
import yaml
from conftest import BF16_CELL, FLOAT_CELLS, accelerate_launch, engine_recipe, is_cell, quantized_cells
from safetensors.torch import load_file

from peftbench import config
from peftbench.records import read_record

pytestmark = pytest.mark.slow  # each starts two Python processes that train every method
ONE_MACHINE = {**FLOAT_CELLS, **BF16_CELL, **quantized_cells("8bit", ["lora", "adapter", "prefix"]),
               **quantized_cells("4bit", ["lora"])}  # each process holds its own copy of a quantised base
SAVED = {"full": "model.safetensors", "adapter": "trainable.safetensors", "prefix": "trainable.safetensors",
         "bitfit": "trainable.safetensors"}  # the rest save a PEFT adapter: adapter_model.safetensors
TOLERANCE = {"lora-bf16": 1e-3}  # bf16 matmuls round by the batch's shape: one batch of 16 or two of 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_file(tmp_path, backbone, cells: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"recipe": config.parse_overrides(engine_recipe(backbone)),
                                    "output_dir": str(tmp_path / "results"),
                                    "grid": {"variants": list(cells.values())}}), encoding="utf-8")
    return path


def assert_every_cell_trains_as_one(results: Path, cells: dict, one_process, machines: int):
    """Each cell's record against the same cell in one process."""
    records = [read_record(p) for p in results.glob("*/record.json")]
    assert len(records) == len(cells)
    for name, tree in cells.items():
        [record] = [r for r in records if is_cell(r, tree)]
        one = one_process(name, tree)
        assert (record["env"]["engine"], record["env"]["num_processes"], record["env"]["num_machines"]) == \
            ("ddp", 2, machines), name
        assert len(record["metrics"]["peak_memory_mb_per_process"]) == 2
        assert record["metrics"]["n_eval"] == record["metrics"]["test_n_eval"] == 300  # every example exactly once
        assert [p["step"] for p in record["loss_curve"]] == [p["step"] for p in one["loss_curve"]] == list(range(1, 11))
        tolerance = TOLERANCE.get(name, 1e-5)
        for a, b in zip(one["loss_curve"], record["loss_curve"]):
            assert abs(a["loss"] - b["loss"]) <= tolerance, (name, one["loss_curve"], record["loss_curve"])
        for a, b in zip(one["dev_history"], record["dev_history"]):
            assert abs(a["score"] - b["score"]) < 1.5 / 300, name  # at most one prediction flips (1/300 is not exact)
        weights = SAVED.get(tree["method"]["name"], "adapter_model.safetensors")
        saved = [load_file(str(Path(r["checkpoint"]) / weights)) for r in (one, record)]
        assert saved[0].keys() == saved[1].keys()
        lr = one["config"]["train"]["lr"]
        for key in saved[0]:  # a key bias's gradient is rounding noise (tests/test_fsdp.py), Adam-scaled to ~lr
            atol = 10 * lr if key.endswith("attention.self.key.bias") else max(tolerance, 1e-5)
            torch.testing.assert_close(saved[1][key], saved[0][key], atol=atol, rtol=0, msg=f"{name} {key}")
    claims = results / ".claims"  # a sweep's
    assert not list(results.rglob("*.tmp")) and not (claims.exists() and list(claims.iterdir()))


def test_accelerate_launch_two_processes_sweep_every_method(still_tiny, one_process, tmp_path):
    """The main process claims each cell, every process runs it; a quantised base is loaded by each."""
    proc = accelerate_launch("--multi_gpu", "--num_processes", "2", "-m", "peftbench", "sweep",
                             str(sweep_file(tmp_path, still_tiny, ONE_MACHINE)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == \
        f"sweep: {len(ONE_MACHINE)} cells, ran {len(ONE_MACHINE)}, done before 0, claimed elsewhere 0, failed 0"
    assert_every_cell_trains_as_one(tmp_path / "results", ONE_MACHINE, one_process, machines=1)


def test_two_machines_on_the_loopback_address(still_tiny, one_process, tmp_path):
    """Two ``accelerate launch`` processes, machine ranks 0 and 1, one process each, meeting at 127.0.0.1."""
    port, sweep = str(free_port()), str(sweep_file(tmp_path, still_tiny, FLOAT_CELLS))
    machines = [accelerate_launch("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                                  str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                                  "-m", "peftbench", "sweep", sweep, wait=False) for rank in (0, 1)]
    for machine in machines:
        out, err = machine.communicate(timeout=900)
        assert machine.returncode == 0, err[-3000:]
    assert_every_cell_trains_as_one(tmp_path / "results", FLOAT_CELLS, one_process, machines=2)
