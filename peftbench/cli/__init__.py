"""Command line: ``peftbench COMMAND``, one command per job (``peftbench --help`` lists them).

``peftbench run`` with no recipe and no ``method.name`` runs the built-in demo:
full fine-tuning and LoRA of the ``tiny`` backbone on the synthetic task, then a
comparison table. Also works as ``accelerate launch -m peftbench run ...``.
"""

from __future__ import annotations

import signal
import sys

from peftbench.cli import failures, results, training
from peftbench.cli.parser import build_parser
from peftbench.errors import DivergedError, Interrupted, PeftbenchError, Stopped, one_line

COMMANDS = {
    "run": training.run_recipe, "sweep": training.run_sweep_file, "pretrain": training.run_pretraining,
    "plan": training.plan_recipe, "leaderboard": results.leaderboard, "predict": results.predict,
    "ensemble": results.ensemble, "export": results.export, "serve": results.serve, "tasks": results.list_tasks,
    "methods": results.list_methods,
}
READ_ONLY = ("leaderboard", "tasks", "methods")  # none of the model libraries loaded
STOPPABLE = ("run", "sweep", "pretrain")  # SIGTERM writes the run's record


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("Parameter-efficient fine-tuning and its benchmarks (peftbench COMMAND --help: its options).")
    ns = parser.parse_args(argv)
    try:
        if ns.command not in READ_ONLY:
            failures.quiet_libraries()
        if ns.command in STOPPABLE:
            failures.stop_on_sigterm()
        return COMMANDS[ns.command](ns)
    except PeftbenchError as exc:
        failures.traceback_if_debugging()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (DivergedError, OSError) as exc:  # expected failures outside a run (a full disk, a lost file)
        failures.traceback_if_debugging()
        print(f"error: {one_line(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # a sweep cut short from outside: its cell's record says so
        failures.traceback_if_debugging()
        print(f"error: {one_line(exc)}; the cell's record is marked interrupted, and the sweep runs it again when "
              "resumed", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Stopped) else 1
