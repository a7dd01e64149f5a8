"""Waiting for the main process's solo work: its heartbeat, and the waits that follow it.

Reading and encoding the data first, writing a checkpoint or a training state, timing the trained model: the
main process works alone while the others wait. A plain barrier fails them after ``train.dist_timeout`` however
alive the main process is (a full model's optimizer state takes minutes to write). At :func:`wait_for_main` they
wait as long as the main process's heartbeat goes on, and end as lost once it has stopped for ``dist_timeout``
(the process died, or it or its machine stopped as a whole) or once the work has taken :data:`SOLO_LIMIT` times
``dist_timeout`` (the heartbeat, a thread of its own, cannot tell a stuck write from a long one). Each wait names
the work it waits for, and the waits are counted within a phase that every process starts together (a run, a
sweep's step: :func:`new_phase`). A main process whose run failed says so (:func:`telling_failure`): the others,
waiting for its solo work, end with the same bad input (:class:`PeftbenchError`) or with :class:`MainProcessFailed`,
and a sweep goes on to its next cell with every process; one that went on without saying so (to a later wait or
phase) ends them with :class:`LostProcess` instead of releasing them into steps it no longer runs.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import torch

from peftbench.errors import Interrupted, LostProcess, MainProcessFailed, PeftbenchError, one_line

BEAT_KEY = "peftbench/main_heartbeat"  # in the process group's store: counted up by the main process
PHASE_KEY = "peftbench/main_phase"  # the phase the main process is in
BEAT_SECONDS = 0.5  # between beats; a waiting process looks every 10 ms at first, then as often as this
SOLO_LIMIT = 12  # the longest solo work the others wait for, in multiples of dist_timeout (an hour at 300 s)
_timeout: float | None = None  # the group's train.dist_timeout: its first run set it, as for every collective
_phase = 0  # phases begun by this process: every process begins the same ones
_waits = 0  # waits passed in this phase: every process passes the same ones in the same order, unless a run fails
_last_done: str | None = None  # the main process's last done key (deleted when it sets the next: all are past it)


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


def new_phase(state) -> None:
    """Every process at the same point (the start of a run, a sweep's step): waits are counted afresh, so that a
    run which failed on the main process between two waits (and told the others) leaves the next phase in step."""
    global _phase, _waits
    if state.num_processes == 1:
        return
    _phase, _waits = _phase + 1, 0
    if state.is_main_process:
        _store().set(PHASE_KEY, str(_phase))


@contextlib.contextmanager
def telling_failure(state):
    """Around a run: when it fails on the main process (not a stop: that ends the group), the others waiting for
    its solo work in this phase are told, and end with the same bad input or with :class:`MainProcessFailed`."""
    try:
        yield
    except Exception as exc:
        if state.num_processes > 1 and state.is_main_process and not isinstance(exc, Interrupted):
            refused = isinstance(exc, PeftbenchError)  # bad input: the same one-line error on every process
            with contextlib.suppress(RuntimeError):  # the store is gone: the others end as lost
                _store().set(_failed_key(_phase), json.dumps({"refused": refused, "error": one_line(
                    exc if refused else f"{type(exc).__name__}: {exc}")}))
        raise


def _failed_key(phase: int) -> str:
    return f"peftbench/main_failed/{phase}"


def wait_for_main(state, work: str) -> None:
    """A barrier behind ``work`` (in words) that the main process does alone: the other processes wait while its
    heartbeat goes on (:class:`LostProcess` once it has not, or once the main process reaches another wait or
    phase; its error when it says its run failed), then every process meets in a plain barrier."""
    global _waits, _last_done
    if state.num_processes == 1:
        return
    _waits += 1
    done, store = f"peftbench/main_done/{_phase}/{_waits}", _store()
    if state.is_main_process:
        store.set(done, work)
        if _last_done is not None:
            store.delete_key(_last_done)  # every process is past it
        _last_done = done
    else:
        _follow_heartbeat(store, done, work, state.process_index, state.num_processes, _phase)
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


def _follow_heartbeat(store, done: str, work: str, process_index: int, processes: int, phase: int) -> None:
    who = f"process {process_index} of {processes} lost the main process while waiting for it to finish {work}"
    went_on = f"{who}: it went on to a later step ({{}}): its own work failed (its log and the run's record say why)"
    start = beat_heard = time.monotonic()
    beat, pause = None, 0.01
    while True:
        try:
            # read in the reverse of the order the main process writes them (a failure, then a later phase)
            main_phase = int(store.get(PHASE_KEY)) if store.check([PHASE_KEY]) else phase
            failed = json.loads(store.get(_failed_key(phase))) if store.check([_failed_key(phase)]) else None
            reached = store.get(done).decode() if store.check([done]) else None
            now = store.add(BEAT_KEY, 0)
        except Interrupted:  # SIGTERM: a stop, not a loss
            raise
        except RuntimeError as exc:  # the store (hosted by the main process or the launcher) is gone
            raise LostProcess(f"{who} (its store stopped answering: {exc})") from exc
        if reached is not None:
            if reached != work:
                raise LostProcess(went_on.format(reached))
            return
        if failed is not None:
            raise (PeftbenchError if failed["refused"] else MainProcessFailed)(
                f"the main process failed while process {process_index} of {processes} waited for it to finish "
                f"{work}: {failed['error']}")
        if main_phase > phase:
            raise LostProcess(went_on.format("the next run or sweep step"))
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
