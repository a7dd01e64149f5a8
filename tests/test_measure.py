import sys

import pytest
import torch

from peftbench.measure import StepTimer, peak_memory_mb, reset_peak_memory

CPU = torch.device("cpu")


def test_step_timer_leaves_warmup_out_and_counts_real_tokens():
    timer = StepTimer(CPU, warmup_steps=3)
    for step in range(1, 11):
        timer.count(samples=4, tokens=10 * step)  # one micro-batch per step
        timer.optimizer_step(step)
    result = timer.result()
    assert result["timed_steps"] == 7 and result["timed_samples"] == 28
    assert result["timed_tokens"] == sum(10 * s for s in range(4, 11))
    assert result["timed_seconds"] > 0


def test_step_timer_pauses_for_evaluation():
    now = [0.0]
    timer = StepTimer(CPU, warmup_steps=0, clock=lambda: now[0])  # a clock the test moves
    now[0] = 1.0
    timer.count(1, 1)
    timer.optimizer_step(1)
    timer.pause()
    now[0] = 100.0  # evaluation: not training time
    timer.resume()
    now[0] = 102.5
    timer.count(1, 1)
    timer.optimizer_step(2)
    assert timer.result()["timed_seconds"] == 3.5


def test_step_timer_counts_the_cpu_time_of_the_timed_steps_only():
    """A process paused or sharing its core gets less CPU time than wall time: the record can tell."""
    now, cpu = [0.0], [0.0]
    timer = StepTimer(CPU, warmup_steps=0, clock=lambda: now[0], cpu_clock=lambda: cpu[0])
    now[0], cpu[0] = 4.0, 1.0  # a step that had the CPU a quarter of its time
    timer.count(1, 1)
    timer.optimizer_step(1)
    timer.pause()
    now[0], cpu[0] = 10.0, 7.0  # evaluation: neither clock counts
    timer.resume()
    now[0], cpu[0] = 12.0, 9.0  # a step alone on its core
    timer.count(1, 1)
    timer.optimizer_step(2)
    result = timer.result()
    assert (result["timed_seconds"], result["timed_cpu_seconds"]) == (6.0, 3.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS reset needs /proc")
def test_cpu_peak_memory_resets_between_runs():
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    high = peak_memory_mb(CPU)["peak_memory_mb"]
    del block
    reset_peak_memory(CPU)
    low = peak_memory_mb(CPU)["peak_memory_mb"]
    assert low < high - 32
