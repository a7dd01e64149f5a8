"""How a command fails: one line for what is expected, a traceback for a bug, and a stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import traceback

from peftbench.errors import DivergedError, PeftbenchError, Stopped, one_line


def traceback_if_debugging() -> None:
    """Expected failures print one line; ``PEFTBENCH_DEBUG=1`` shows where they came from."""
    if os.environ.get("PEFTBENCH_DEBUG") == "1":
        traceback.print_exc()


def expected_failure(exc: BaseException) -> bool:
    """Divergence and I/O errors (a full disk) are expected: they are reported, not debugged. safetensors
    wraps I/O errors in its own type."""
    return isinstance(exc, (DivergedError, OSError)) or (type(exc).__name__ == "SafetensorError"
                                                         and "I/O error" in str(exc))


def report_failed_run(exc: Exception, out_dir) -> None:
    """One line for a run that failed: why, and where its failed record is (or why none could be written).
    Divergence and I/O errors are expected; anything else is a bug and shows its traceback."""
    from peftbench.records import error_text

    if expected_failure(exc):
        traceback_if_debugging()
    else:
        traceback.print_exc()
    note = getattr(exc, "record_error", None)
    where = f"the earlier successful run in {out_dir} is kept" if getattr(exc, "kept_success", False) else \
        f"the failed record could not be written: {note}" if note else f"failed record in {out_dir}"
    print(f"error: {one_line(f'run failed: {error_text(exc)} ({where})')}", file=sys.stderr)


def quiet_libraries() -> None:
    """Keep progress output to peftbench's own training bar."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def reported(job, cfg):
    """``job(cfg)``; a run that fails (not bad input: that raises) is reported in one line and gives None."""
    try:
        return job(cfg)
    except PeftbenchError:
        raise
    except Exception as exc:
        report_failed_run(exc, cfg.output_dir)
        return None


def stop_on_sigterm() -> None:
    """SIGTERM (a launcher stopping every process because one failed, a scheduler ending the job) raises
    :class:`Stopped` in the main thread: the run writes its failed record saying so and exits non-zero. A signal
    that lands while a failure is being handled leaves that failure to be recorded."""

    def stop(signum, frame):
        if sys.exc_info()[1] is not None:  # already failing (a lost process, most often): that failure is recorded
            return
        raise Stopped(f"stopped by {signal.Signals(signum).name} (a launcher stops every process when one of them "
                      "fails; a scheduler stops a job)")

    signal.signal(signal.SIGTERM, stop)
