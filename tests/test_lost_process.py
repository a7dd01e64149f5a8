"""When a process or a machine is lost: the others end within ``train.dist_timeout`` with a failed record naming
what was lost, and the same launch with ``train.resume=true`` continues the run from its last state."""

import contextlib
import json
import os
import random
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
from peftbench import heartbeat
from peftbench.heartbeat import wait_for_main
from peftbench.loop import process_state

how, timeout, alone = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
if how == "stuck":  # the heartbeat goes on, the work does not end: the others wait 2 x the timeout, not 12
    heartbeat.SOLO_LIMIT = 2
state = process_state(timeout)
state.wait_for_everyone()
start = time.monotonic()
if state.is_main_process:
    if how == "freeze":  # as a machine that fell silent: no heartbeat, no answer
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(alone)  # the main process's work alone (a checkpoint, a training state, the serving cost)
    if how == "fails":  # that work failed; caught, as a sweep catches a cell's error, it goes on to its next wait
        wait_for_main(state, "a sweep's next step")
barrier = state.wait_for_everyone if how == "barrier" else lambda: wait_for_main(state, "its own work")
try:
    barrier()
except LostProcess as exc:
    print(f"after {time.monotonic() - start:.1f} s: {exc}", flush=True)
    os._exit(3)
print(f"process {state.process_index} through after {time.monotonic() - start:.1f} s", flush=True)
"""


def run_main_alone(tmp_path, how: str, alone: float, limit: float = 120) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "main_alone.py"
    script.write_text(MAIN_ALONE)
    launch = start(torchrun(str(script), how, "3", str(alone)), start_new_session=True)
    try:
        out, err = launch.communicate(timeout=limit)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launch.pid, signal.SIGKILL)  # a frozen main process stays behind its launcher
    return launch, out + err


def test_the_others_wait_for_the_main_process_working_alone_longer_than_the_timeout(tmp_path):
    """Writing a large checkpoint or training state takes longer than ``train.dist_timeout``: a plain barrier
    fails the waiting process (the first launch), waiting on the main process's heartbeat does not."""
    plain, said = run_main_alone(tmp_path, "barrier", 9)
    assert plain.returncode != 0 and "process 1 through" not in said and "timed out" in said.lower(), said[-2000:]
    followed, said = run_main_alone(tmp_path, "heartbeat", 9)
    assert followed.returncode == 0, said[-2000:]
    waited = {line.split()[1]: float(line.split(" after ")[1].split(" s")[0]) for line in said.splitlines()
              if " through after " in line}
    assert waited.keys() == {"0", "1"} and waited["1"] > 2 * 3, said[-2000:]  # twice the timeout


@pytest.mark.parametrize("how, alone, why, seconds", [
    ("freeze", 0, "no heartbeat for train.dist_timeout=3 s", 3),
    ("stuck", 30, "it has not finished in 2 x train.dist_timeout=3 s", 6),
    ("fails", 1, "it went on to a later step (a sweep's next step): its own work failed", 1)])
def test_a_main_process_that_stops_sticks_or_fails_while_working_alone_ends_the_others(tmp_path, how, alone, why,
                                                                                      seconds):
    """Frozen (no heartbeat): the others end after the timeout; stuck in its work (a write that never returns,
    while its heartbeat thread goes on): after ``SOLO_LIMIT`` times the timeout; failed, and gone on to a later
    wait: at once, instead of being let through into steps the main process no longer runs."""
    launch, said = run_main_alone(tmp_path, how, alone)  # torchrun waits 30 s before it kills a frozen process
    lost = [line for line in said.splitlines() if "lost the main process" in line]
    assert lost and launch.returncode != 0, said[-2000:]
    waited = float(lost[0].split("after ")[1].split(" s:")[0])
    assert seconds <= waited < seconds + 5, lost[0]
    assert f"process 1 of 2 lost the main process while waiting for it to finish its own work: {why}" in lost[0]
