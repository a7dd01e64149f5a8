"""Waiting for the main process's solo work: its heartbeat, and a barrier that follows it.

Writing a checkpoint or a training state, and timing the trained model, are the main process's work alone while
the others wait. A plain barrier fails them after ``train.dist_timeout`` however alive the main process is (a
full model's optimizer state takes minutes to write). At :func:`wait_for_main` they wait as long as the main
process's heartbeat goes on, and end as lost within ``dist_timeout`` once it stops: the process died, froze, or
its machine fell silent.
"""

from __future__ import annotations

import threading
import time

import torch

from peftbench.errors import LostProcess

BEAT_KEY = "peftbench/main_heartbeat"  # in the process group's store: counted up by the main process
BEAT_SECONDS = 0.5  # between beats; a waiting process looks as often
_beating: threading.Thread | None = None
_waits = 0  # waits passed by this process: every process passes the same ones in the same order


def _store():
    return torch.distributed.distributed_c10d._get_default_store()


def start_beating(state) -> None:
    """On the main process of several (``state``: Accelerate's ``PartialState``): a daemon thread counting up
    :data:`BEAT_KEY` of the group's store every :data:`BEAT_SECONDS`, for the life of the process."""
    global _beating
    if state.num_processes == 1 or not state.is_main_process or _beating is not None:
        return
    store = _store()

    def beat() -> None:
        while True:
            try:
                store.add(BEAT_KEY, 1)
            except RuntimeError:  # the group's store is gone: the launch is ending
                return
            time.sleep(BEAT_SECONDS)

    _beating = threading.Thread(target=beat, name="peftbench-main-heartbeat", daemon=True)
    _beating.start()


def wait_for_main(state, dist_timeout: int) -> None:
    """A barrier behind work the main process does alone: the other processes wait while its heartbeat goes on
    (:class:`LostProcess` once it has stopped for ``dist_timeout`` seconds), then every process meets in a
    plain barrier."""
    global _waits
    if state.num_processes == 1:
        return
    _waits += 1
    done, store = f"peftbench/main_done/{_waits}", _store()
    if state.is_main_process:
        store.set(done, "1")
    else:
        _follow_heartbeat(store, done, state.process_index, state.num_processes, dist_timeout)
    state.wait_for_everyone()


def _follow_heartbeat(store, done: str, process_index: int, processes: int, dist_timeout: int) -> None:
    beat, heard = None, time.monotonic()
    while True:
        try:
            if store.check([done]):
                return
            now = store.add(BEAT_KEY, 0)
        except RuntimeError as exc:  # the store (hosted by the main process or the launcher) is gone
            raise LostProcess(f"process {process_index} of {processes} lost the main process while waiting for "
                              f"it to finish its own work (its store stopped answering: {exc})") from exc
        if now != beat:
            beat, heard = now, time.monotonic()
        elif time.monotonic() - heard > dist_timeout:
            raise LostProcess(f"process {process_index} of {processes} lost the main process while waiting for it "
                              f"to finish its own work: no heartbeat for train.dist_timeout={dist_timeout} s (it "
                              "died, froze, or its machine fell silent)")
        time.sleep(BEAT_SECONDS)
