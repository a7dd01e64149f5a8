"""The wait of the other processes for the main one's solo work, against a store whose answers the test sets
(tests/test_lost_process.py runs it with two real processes)."""

import json

import pytest

from peftbench import heartbeat
from peftbench.errors import LostProcess, MainProcessFailed, PeftbenchError, Stopped


class FakeStore:
    """A process group's store as the waiting process (in phase 1) sees it: the main process beats ``beating``
    times a look; at the ``at``-th look it writes ``done`` (the work it finished), says its run failed
    (``failed``: what :func:`heartbeat.telling_failure` writes), begins phase ``phase``, or the store raises
    ``error``."""

    def __init__(self, beating: bool, done: str | None = None, at: int = 3, error: Exception | None = None,
                 failed: dict | None = None, phase: int = 1):
        self.beating, self.at, self.error, self.looks, self.beats = beating, at, error, 0, 0
        self.later = {"done-key": done, heartbeat._failed_key(1): failed and json.dumps(failed),
                      heartbeat.PHASE_KEY: str(phase)}

    def check(self, keys):
        (key,) = keys
        if key == "done-key":  # the first look of each round
            self.looks += 1
        if self.error is not None and self.looks >= self.at:
            raise self.error
        return self.looks >= self.at and self.later[key] is not None

    def get(self, key):
        return self.later[key].encode()

    def add(self, key, amount):
        self.beats += amount or self.beating
        return self.beats


@pytest.mark.parametrize("store, why", [
    (FakeStore(beating=False), "no heartbeat for train.dist_timeout=0.2 s (it died, or it or its machine stopped)"),
    (FakeStore(beating=True), "it has not finished in 12 x train.dist_timeout=0.2 s (a stuck write or request"),
    (FakeStore(beating=True, done="a sweep's next step"),
     "it went on to a later step (a sweep's next step): its own work failed"),
    (FakeStore(beating=True, phase=2), "it went on to a later step (the next run or sweep step): its own work"),
    (FakeStore(beating=True, error=RuntimeError("Connection reset by peer")),
     "(its store stopped answering: Connection reset by peer)"),
], ids=["silent", "stuck", "went-on", "next-phase", "store-gone"])
def test_a_waiting_process_ends_as_lost_when_the_main_process_is(monkeypatch, store, why):
    monkeypatch.setattr(heartbeat, "_timeout", 0.2)
    with pytest.raises(LostProcess) as lost:
        heartbeat._follow_heartbeat(store, "done-key", "writing the checkpoint", 1, 2, 1)
    assert str(lost.value).startswith("process 1 of 2 lost the main process while waiting for it to finish writing "
                                      "the checkpoint") and why in str(lost.value), str(lost.value)
    heartbeat._follow_heartbeat(FakeStore(beating=False, done="writing the checkpoint"), "done-key",
                                "writing the checkpoint", 1, 2, 1)  # its own work done: through
    with pytest.raises(Stopped):  # SIGTERM while waiting stays a stop, not a loss
        heartbeat._follow_heartbeat(FakeStore(beating=True, error=Stopped("stopped by SIGTERM")), "done-key",
                                    "writing the checkpoint", 1, 2, 1)


@pytest.mark.parametrize("refused", [True, False], ids=["bad-input", "crash"])
def test_a_waiting_process_ends_with_the_error_the_main_process_says_its_run_failed_with(monkeypatch, refused):
    """A bad input the main process found alone (its data read first) is the same bad input on the others, so that
    a sweep refuses the cell on every process and goes on; any other failure ends them as a failed run."""
    monkeypatch.setattr(heartbeat, "_timeout", 0.2)
    error = "data/train.json:3: not JSON" if refused else "OSError: [Errno 28] No space left on device"
    store = FakeStore(beating=True, failed={"refused": refused, "error": error})
    with pytest.raises(PeftbenchError if refused else MainProcessFailed) as failed:
        heartbeat._follow_heartbeat(store, "done-key", "reading and encoding the data", 1, 2, 1)
    assert str(failed.value) == ("the main process failed while process 1 of 2 waited for it to finish reading and "
                                 f"encoding the data: {error}")


def test_the_main_process_tells_the_others_of_a_failed_run_but_not_of_a_stop(monkeypatch):
    from types import SimpleNamespace

    from peftbench.errors import Interrupted

    written = {}
    monkeypatch.setattr(heartbeat, "_store", lambda: SimpleNamespace(set=written.__setitem__))
    monkeypatch.setattr(heartbeat, "_phase", 4)
    main, other = (SimpleNamespace(num_processes=2, is_main_process=m) for m in (True, False))

    def fail(state, exc):
        with pytest.raises(type(exc)) as raised, heartbeat.telling_failure(state):
            raise exc
        assert raised.value is exc  # raised on, unchanged

    fail(other, PeftbenchError("x"))
    fail(main, Stopped("stopped by SIGTERM"))
    fail(main, Interrupted("lost"))
    assert written == {}  # the others find a stop or a lost process themselves
    fail(main, PeftbenchError("data/train.json:3:\nnot JSON"))
    assert json.loads(written.pop(heartbeat._failed_key(4))) == {"refused": True,
                                                                  "error": "data/train.json:3: not JSON"}
    fail(main, OSError(28, "No space left on device"))
    assert json.loads(written[heartbeat._failed_key(4)]) == {
        "refused": False, "error": "OSError: [Errno 28] No space left on device"}
