"""Fine-tuning recipe: ``setup_data``, ``setup_model``, the one loop (``loop.fit``), ``evaluate``, ``save``.

Seed, data (the main process first: ``heartbeat.main_first``), model + method (what it trains is
declared, the rest frozen in one place), AdamW with linear warm-up/decay, dev
evaluation each epoch with ``gather_for_metrics``, the best dev state kept, test
evaluation of that state, checkpoint, record. The method and the task kind are
asked, never named. ``run`` (here) publishes a run; ``setup`` loads its data and model, ``fine_tuning`` trains
and evaluates it, ``resume`` reloads a killed run's training state, ``saving`` writes its checkpoint,
``evaluation`` scores a split.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peftbench import checkpoint, distributed
from peftbench.config import RunConfig
from peftbench.heartbeat import telling_failure, wait_for_main
from peftbench.loop import make_accelerator, release, start_tracking, stop_tracking
from peftbench.methods import get_method
from peftbench.records import RECORD_NAME, environment, failed_record_on_error, holds_success, make_record, write_atomic
from peftbench.train.evaluation import evaluate
from peftbench.train.fine_tuning import fine_tune
from peftbench.train.saving import save
from peftbench.train.setup import Data, encode_task, setup_data, setup_model

__all__ = ["Data", "RunResult", "default_output_dir", "encode_task", "evaluate", "run", "save", "setup_data",
           "setup_model"]


def default_output_dir(cfg: RunConfig) -> str:
    return f"runs/{cfg.task.name}-{cfg.method.name}-{cfg.run_id[:8]}"


@dataclass
class RunResult:
    record: dict
    model: torch.nn.Module  # the trained model (best dev state), unwrapped
    tokenizer: object


def run(cfg: RunConfig, provenance: dict | None = None) -> RunResult:
    """Train and evaluate one configuration; write its record. A crash writes a failed record.

    The record and the checkpoint are built in a staging folder beside ``output_dir`` and swapped in
    together at the end (a failed run's record too, without a checkpoint, unless ``output_dir`` holds a
    successful run: that is kept); a run cut short by Ctrl-C leaves ``output_dir`` as it was. ``provenance``
    (e.g. the sweep a run belongs to) is stored in the record as is.
    """
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir(cfg)
    launch = distributed.launch(cfg.train.sharding)  # before the accelerator: it takes an FSDP launch over
    accelerator = make_accelerator(cfg.train, cfg.train.compile,
                                   checkpoint.staging_dir(Path(cfg.output_dir)) / checkpoint.TRACKERS_DIR)
    with telling_failure(accelerator):  # the others may be waiting for the main process's solo work
        return _run(cfg, accelerator, launch, {"provenance": provenance} if provenance else {})


def _run(cfg: RunConfig, accelerator, launch: distributed.Launch, extra: dict) -> RunResult:
    """The run on its accelerator: folder, training (``fine_tune``), record, publication."""
    out_dir = Path(cfg.output_dir)
    stage = checkpoint.staging_dir(out_dir)
    distributed.check(cfg, launch, accelerator.device.type == "cuda", get_method(cfg.method.name).reads_gradients,
                      accelerator)  # refuse what this launch cannot run, before any work
    main = accelerator.is_main_process
    if main:
        checkpoint.prepare_run_dir(out_dir)
    wait_for_main(accelerator, "preparing the run's folder")
    env = {**environment(accelerator.num_processes), **launch.describe()}
    start = time.perf_counter()
    start_tracking(accelerator, cfg.run_id, cfg.to_dict(), out_dir.parent)
    try:
        with failed_record_on_error(stage / RECORD_NAME, cfg.to_dict(), cfg.run_id, env, main, extra) as phase, \
                distributed.naming_lost_processes(accelerator.process_index, accelerator.num_processes,
                                                  cfg.train.dist_timeout):
            model, tokenizer, result = fine_tune(cfg, accelerator, launch, stage, out_dir, phase, extra)
    except Exception as exc:
        stop_tracking(accelerator)
        if main:  # publish the failed record alone (no half-written checkpoint), or keep the old run if it succeeded
            shutil.rmtree(stage / checkpoint.CHECKPOINT_DIR, ignore_errors=True)
            exc.kept_success = holds_success(out_dir)
            if (stage / RECORD_NAME).is_file() and not exc.kept_success:
                checkpoint.publish(stage, out_dir)
            else:
                shutil.rmtree(stage, ignore_errors=True)
        raise
    result["metrics"]["wall_s"] = time.perf_counter() - start
    accelerator.log({f"final/{k}": v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
                    step=result["total_steps"])
    stop_tracking(accelerator)
    record = make_record("success", cfg.to_dict(), cfg.run_id, env, result.pop("metrics"), result.pop("params"),
                         extra={**extra, **result})
    if main:
        write_atomic(stage / RECORD_NAME, record)
        checkpoint.publish(stage, out_dir)
        checkpoint.remove_state(checkpoint.training_state_dir(out_dir))  # the run is whole: nothing to resume
    wait_for_main(accelerator, "writing the checkpoint, timing the model and writing the record")
    release(accelerator)  # a sweep runs many cells in one process
    return RunResult(record, model, tokenizer)
