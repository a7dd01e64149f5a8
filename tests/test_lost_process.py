"""When a process or a machine is lost: the others end within ``train.dist_timeout`` with a failed record naming
what was lost, and the same launch with ``train.resume=true`` continues the run from its last state."""

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FLOAT_CELLS, cell_overrides, engine_recipe
from test_launch import assert_every_cell_trains_as_one, free_port

from peftbench import checkpoint
from peftbench.records import read_record

pytestmark = pytest.mark.slow  # each starts two Python processes
TIMEOUT = 10  # train.dist_timeout of these runs, in seconds
LONG_RUN = ["task.name=synthetic", "method.name=lora", "task.max_length=32", "train.max_steps=2000",
            "train.batch_size=8", "train.measure_inference=false", f"train.dist_timeout={TIMEOUT}",
            "train.save_state_every=1"]  # a state after every step: the test sees training under way


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def saved_step(out: Path) -> int:
    path = checkpoint.training_state_dir(out) / checkpoint.LOOP_STATE_FILE
    try:
        return json.loads(path.read_text())["loop"]["step"]
    except (OSError, ValueError):  # not yet written
        return 0


def wait_for_step(out: Path, step: int, *procs: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while saved_step(out) < step:
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no training state of step {step} in {limit} s"
        time.sleep(0.05)


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the worker processes ``launcher`` (torchrun's agent, in its own process or in ``accelerate
    launch``) started; they run in sessions of their own."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                       if "=" in item)
        except (OSError, IndexError):
            continue
        if parent == launcher.pid and "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


def torchrun(*args: str) -> list[str]:
    # the agent checks its workers every 2 s: a survivor meets the lost peer in its next collective first
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--monitor-interval", "2", *args]


def test_a_killed_rank_ends_the_others_with_a_failed_record(tmp_path):
    out = tmp_path / "run"
    launch = start(torchrun("-m", "peftbench", "run", *LONG_RUN, f"output_dir={out}"))
    wait_for_step(out, 3, launch)
    os.kill(workers(launch)[1], signal.SIGKILL)
    killed = time.monotonic()
    launch.communicate(timeout=120)
    assert launch.returncode != 0 and time.monotonic() - killed < TIMEOUT
    record = read_record(out / "record.json")
    assert record["status"] == "failed" and record["interrupted"] is True, record["error"]
    assert record["error"].startswith("LostProcess: process 0 of 2 lost another process of the group"), \
        record["error"]
    assert "Connection" in record["error"]  # gloo's words: the peer closed its connection
    assert not (out / "checkpoint").exists()  # nothing but the failed record is published


def test_a_silent_machine_ends_the_other_within_the_timeout(tmp_path):
    """Two ``accelerate launch`` machines on the loopback address; the second stops answering (its processes
    frozen, as a machine that fell off the network): the first gives up after ``train.dist_timeout``."""
    out, port = tmp_path / "run", str(free_port())
    machines = [start([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
                       "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                       "--main_process_port", port, "-m", "peftbench", "run", *LONG_RUN, f"output_dir={out}"])
                for rank in (0, 1)]
    second = [machines[1].pid]  # the second machine's processes: its launcher, then its worker
    try:
        wait_for_step(out, 3, *machines)
        [(_, survivor)], [(_, silent)] = (workers(machine).items() for machine in machines)
        second.append(silent)
        for pid in second:
            os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        while Path(f"/proc/{survivor}").exists() and Path(f"/proc/{survivor}/stat").read_text().split()[2] != "Z":
            time.sleep(0.1)
        waited = time.monotonic() - stopped  # until the first machine's worker has ended
    finally:
        for pid in second:
            os.kill(pid, signal.SIGKILL)
    machines[1].communicate()
    machines[0].communicate(timeout=120)
    assert machines[0].returncode != 0 and TIMEOUT - 1 < waited < TIMEOUT + 20, waited
    record = read_record(out / "record.json")
    assert record["status"] == "failed" and record["interrupted"] is True
    assert record["error"].startswith("LostProcess: process 0 of 2 lost another process of the group (it died, or "
                                      f"did not answer within train.dist_timeout={TIMEOUT} s)"), record["error"]
    assert "Timed out" in record["error"]


def test_a_run_killed_under_two_processes_resumes_when_launched_again(still_tiny, one_process, tmp_path):
    """A rank killed at a random step: the run fails; the same launch again with ``train.resume=true`` continues
    from the last state and ends as the same run in one process does."""
    cell = FLOAT_CELLS["lora"]
    results = tmp_path / "results"
    out = results / "run"
    argv = torchrun("-m", "peftbench", "run", *engine_recipe(still_tiny), *cell_overrides(cell),
                    "train.save_state_every=2", "train.resume=true", f"output_dir={out}")
    launch = start(argv)
    step = random.Random(0).choice([2, 4])
    wait_for_step(out, step, launch)
    os.kill(workers(launch)[1], signal.SIGKILL)
    launch.communicate(timeout=120)
    assert launch.returncode != 0 and read_record(out / "record.json")["interrupted"] is True
    saved = saved_step(out)
    assert step <= saved < 10
    again = start(argv)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    record = read_record(out / "record.json")
    assert record["status"] == "success" and record["resumed_from"] == [saved]
    assert_every_cell_trains_as_one(results, {"lora": cell}, one_process, machines=1)
    assert not checkpoint.training_state_dir(out).exists()


MAIN_ALONE = """
import os, signal, sys, time
from peftbench.errors import LostProcess
from peftbench.heartbeat import wait_for_main
from peftbench.loop import process_state

how, timeout, alone = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
state = process_state(timeout)
state.wait_for_everyone()
start = time.monotonic()
if state.is_main_process:
    if how == "freeze":  # as a machine that fell silent: no heartbeat, no answer
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(alone)  # the main process's work alone (a checkpoint, a training state, the serving cost)
barrier = state.wait_for_everyone if how == "barrier" else lambda: wait_for_main(state, "its own work")
try:
    barrier()
except LostProcess as exc:
    print(f"after {time.monotonic() - start:.1f} s: {exc}", flush=True)
    os._exit(3)
print(f"process {state.process_index} through after {time.monotonic() - start:.1f} s", flush=True)
"""


def run_main_alone(tmp_path, how: str, alone: float) -> tuple[int, str]:
    """Two processes of the script above (timeout 3 s): the launch's exit status and its output, read until the
    launch ends or a process reports the main one lost (a frozen one is not waited for)."""
    script = tmp_path / "main_alone.py"
    script.write_text(MAIN_ALONE)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    launch = subprocess.Popen(torchrun(str(script), how, "3", str(alone)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    said = ""
    try:
        for line in launch.stdout:
            said += line
            if "lost the main process" in line:
                break
    finally:
        for pid in [*workers(launch).values(), launch.pid]:  # the workers run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launch.wait(timeout=60)
    return launch.returncode, said


def test_the_others_wait_for_the_main_process_working_alone_longer_than_the_timeout(tmp_path):
    """Writing a large checkpoint or training state takes longer than ``train.dist_timeout``: a plain barrier
    fails the waiting process (the first launch), waiting on the main process's heartbeat does not."""
    status, said = run_main_alone(tmp_path, "barrier", 7)
    assert status != 0 and "process 1 through" not in said and "timed out" in said.lower(), said[-2000:]
    status, said = run_main_alone(tmp_path, "heartbeat", 7)
    waited = dict(re.findall(r"process (\d) through after ([\d.]+) s", said))  # lines of two processes may mix
    assert status == 0 and waited.keys() == {"0", "1"} and float(waited["1"]) > 2 * 3, said[-2000:]


def test_a_main_process_that_freezes_while_working_alone_ends_the_others_within_the_timeout(tmp_path):
    status, said = run_main_alone(tmp_path, "freeze", 0)
    lost = re.search(r"after ([\d.]+) s: (process 1 of 2 lost the main process while waiting for it to finish its "
                     r"own work: no heartbeat for train.dist_timeout=3 s)", said)
    assert lost and 3 <= float(lost.group(1)) < 3 + 5, said[-2000:]


def test_a_cell_whose_data_only_the_main_process_reads_bad_is_refused_on_both_and_the_sweep_goes_on(tmp_path):
    """The main process reads and encodes a cell's data first, alone: a bad line there is its error alone. It tells
    the waiting process, which refuses the cell with the same error instead of losing the main process when the
    sweep goes on; the next cell runs on both."""
    from peftbench.tasks.synthetic import write_files

    good, bad = write_files(tmp_path / "good"), write_files(tmp_path / "bad")
    with (bad / "train_few_all.json").open("a", encoding="utf-8") as fh:
        fh.write("not json\n")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(json.dumps({
        "recipe": {"task": {"name": "synthetic", "max_length": 32, "max_train_samples": 32},
                   "method": {"name": "lora"},
                   "train": {"max_steps": 2, "batch_size": 8, "measure_inference": False, "evaluate_test": False,
                             "save_checkpoint": False, "dist_timeout": TIMEOUT}},
        "grid": {"task.data_dir": [str(bad), str(good)]}, "output_dir": str(tmp_path / "results")}))
    launch = start(torchrun("-m", "peftbench", "sweep", str(spec)))
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 1, err[-3000:]  # a refused cell: the sweep says so in its exit status
    assert out.strip().splitlines()[-1] == \
        "sweep: 2 cells, ran 2, done before 0, claimed elsewhere 0, failed 0, refused 1", out[-2000:]
    refusals = re.findall(r"cell \w+ refused: (.*)", err)
    assert len(refusals) == 2 and "lost the main process" not in err, err[-3000:]
    assert all(f"{bad / 'train_few_all.json'}:1001" in line for line in refusals), refusals
    assert refusals[1 - refusals.index(min(refusals, key=len))].startswith("the main process failed while process 1 "
                                                                          "of 2 waited for it to finish reading")
    (record,) = [read_record(p) for p in (tmp_path / "results").glob("*/record.json")]
    assert record["status"] == "success" and record["config"]["task"]["data_dir"] == str(good)
