"""The wait of the other processes for the main one's solo work, against a store whose answers the test sets
(tests/test_lost_process.py runs it with two real processes)."""

import pytest

from peftbench import heartbeat
from peftbench.errors import LostProcess, Stopped


class FakeStore:
    """A process group's store as the waiting process sees it: the main process beats ``beating`` times a look,
    and writes ``done`` (the work it finished) at the ``done_at``-th look, or raises ``error`` there."""

    def __init__(self, beating: bool, done: str | None = None, done_at: int = 3, error: Exception | None = None):
        self.beating, self.done, self.done_at, self.error, self.looks, self.beats = beating, done, done_at, error, 0, 0

    def check(self, keys):
        self.looks += 1
        if self.error is not None and self.looks >= self.done_at:
            raise self.error
        return self.done is not None and self.looks >= self.done_at

    def get(self, key):
        return self.done.encode()

    def add(self, key, amount):
        self.beats += amount or self.beating
        return self.beats


@pytest.mark.parametrize("store, why", [
    (FakeStore(beating=False), "no heartbeat for train.dist_timeout=0.2 s (it died, or it or its machine stopped)"),
    (FakeStore(beating=True), "it has not finished in 12 x train.dist_timeout=0.2 s (a stuck write or request"),
    (FakeStore(beating=True, done="a sweep's next step"),
     "it went on to a later step (a sweep's next step): its own work failed"),
    (FakeStore(beating=True, error=RuntimeError("Connection reset by peer")),
     "(its store stopped answering: Connection reset by peer)"),
], ids=["silent", "stuck", "went-on", "store-gone"])
def test_a_waiting_process_ends_as_lost_when_the_main_process_is(monkeypatch, store, why):
    monkeypatch.setattr(heartbeat, "_timeout", 0.2)
    with pytest.raises(LostProcess) as lost:
        heartbeat._follow_heartbeat(store, "done-key", "writing the checkpoint", 1, 2)
    assert str(lost.value).startswith("process 1 of 2 lost the main process while waiting for it to finish writing "
                                      "the checkpoint") and why in str(lost.value), str(lost.value)
    heartbeat._follow_heartbeat(FakeStore(beating=False, done="writing the checkpoint"), "done-key",
                                "writing the checkpoint", 1, 2)  # its own work done: through
    with pytest.raises(Stopped):  # SIGTERM while waiting stays a stop, not a loss
        heartbeat._follow_heartbeat(FakeStore(beating=True, error=Stopped("stopped by SIGTERM")), "done-key",
                                    "writing the checkpoint", 1, 2)
