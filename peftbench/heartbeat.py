"""Waiting for the main process's solo work: its heartbeat, and the waits that follow it.

Reading and encoding the data first, writing a checkpoint or a training state, timing the trained model: the
main process works alone while the others wait. A plain barrier fails them after ``train.dist_timeout`` however
alive the main process is (a full model's optimizer state takes minutes to write). At :func:`wait_for_main` they
wait as long as the main process's heartbeat goes on, and end as lost once it has stopped for ``dist_timeout``
(the process died, or it or its machine stopped as a whole) or once the work has taken :data:`SOLO_LIMIT` times
``dist_timeout`` (the heartbeat, a thread of its own, cannot tell a stuck write from a long one). Each wait names
the work it waits for: a main process whose solo work failed, and which went on to a later wait (a sweep's next
cell), ends the others with :class:`LostProcess` instead of releasing them into steps it no longer runs.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from peftbench.errors import Interrupted, LostProcess

BEAT_KEY = "peftbench/main_heartbeat"  # in the process group's store: counted up by the main process
BEAT_SECONDS = 0.5  # between beats; a waiting process looks every 10 ms at first, then as often as this
SOLO_LIMIT = 12  # the longest solo work the others wait for, in multiples of dist_timeout (an hour at 300 s)
_timeout: float | None = None  # the group's train.dist_timeout: its first run set it, as for every collective
_waits = 0  # waits passed by this process: every process passes the same ones in the same order


def _store():
    return torch.distributed.distributed_c10d._get_default_store()


def start_beating(state, dist_timeout: float) -> None:
    """Once per process of several (``state``: Accelerate's ``PartialState``): keep the group's ``dist_timeout``
    for the waits and, on the main process, start a daemon thread counting up :data:`BEAT_KEY` of the group's
    store every :data:`BEAT_SECONDS`, for the life of the process."""
    global _timeout
    if state.num_processes == 1 or _timeout is not None:
        return
    _timeout = dist_timeout
    if not state.is_main_process:
        return
    store = _store()

    def beat() -> None:
        while True:
            try:
                store.add(BEAT_KEY, 1)
            except RuntimeError:  # the group's store is gone: the launch is ending
                return
            time.sleep(BEAT_SECONDS)

    threading.Thread(target=beat, name="peftbench-main-heartbeat", daemon=True).start()


def wait_for_main(state, work: str) -> None:
    """A barrier behind ``work`` (in words) that the main process does alone: the other processes wait while its
    heartbeat goes on (:class:`LostProcess` once it has not, or once the main process reaches another wait),
    then every process meets in a plain barrier."""
    global _waits
    if state.num_processes == 1:
        return
    _waits += 1
    done, store = f"peftbench/main_done/{_waits}", _store()
    if state.is_main_process:
        store.set(done, work)
        if _waits > 1:
            store.delete_key(f"peftbench/main_done/{_waits - 1}")  # every process is past it
    else:
        _follow_heartbeat(store, done, work, state.process_index, state.num_processes)
    state.wait_for_everyone()


@contextlib.contextmanager
def main_first(state, work: str):
    """Accelerate's ``main_process_first`` (the main process does ``work`` first: it fills the caches the others
    read), the others waiting as :func:`wait_for_main` does."""
    if not state.is_main_process:
        wait_for_main(state, work)
    yield
    if state.is_main_process:
        wait_for_main(state, work)


def _follow_heartbeat(store, done: str, work: str, process_index: int, processes: int) -> None:
    who = f"process {process_index} of {processes} lost the main process while waiting for it to finish {work}"
    start = beat_heard = time.monotonic()
    beat, pause = None, 0.01
    while True:
        try:
            if store.check([done]):
                reached = store.get(done).decode()
                if reached != work:
                    raise LostProcess(f"{who}: it went on to a later step ({reached}): its own work failed (its "
                                      "log and the run's record say why)")
                return
            now = store.add(BEAT_KEY, 0)
        except Interrupted:  # SIGTERM: a stop, not a loss
            raise
        except RuntimeError as exc:  # the store (hosted by the main process or the launcher) is gone
            raise LostProcess(f"{who} (its store stopped answering: {exc})") from exc
        if now != beat:
            beat, beat_heard = now, time.monotonic()
        elif time.monotonic() - beat_heard > _timeout:
            raise LostProcess(f"{who}: no heartbeat for train.dist_timeout={_timeout:g} s (it died, or it or its "
                              "machine stopped)")
        if time.monotonic() - start > SOLO_LIMIT * _timeout:
            raise LostProcess(f"{who}: it has not finished in {SOLO_LIMIT} x train.dist_timeout={_timeout:g} s (a "
                              "stuck write or request; raise train.dist_timeout for longer work)")
        time.sleep(pause)
        pause = min(2 * pause, BEAT_SECONDS)
