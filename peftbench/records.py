"""The result record: one JSON file per run, written atomically, with its provenance."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from peftbench.errors import DivergedError, Interrupted, PeftbenchError

NOT_IDENTITY = ("report_to", "measure_inference", "dist_timeout", "save_state_every", "resume")  # train.* keys of a
# run's config that change no result: left out of its run id and of a leaderboard row's identity

SCHEMA_VERSION = 2  # 2 added metrics.score / score_name (the task's headline metric), so NER fits
RECORD_NAME = "record.json"  # a fine-tuning run's record
PRETRAIN_RECORD_NAME = "pretrain_record.json"
REQUIRED = {
    "metrics": ("score", "score_name", "n_eval", "train_samples_per_s", "train_tokens_per_s",
                "eval_samples_per_s", "peak_memory_mb", "wall_s"),
    "params": ("trainable", "total", "adapter_bytes"),
}
PACKAGES = ("peftbench", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


def strict_json(data: dict) -> dict:
    """``data`` with every NaN or infinite number replaced by null, and ``non_finite`` naming each replaced
    field and its value (JSON has no NaN; a reader must not be handed one)."""
    found = {}

    def clean(value, where):
        if isinstance(value, float) and not math.isfinite(value):
            found[where] = repr(value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    cleaned = clean(data, "")
    return {**cleaned, "non_finite": found} if found else cleaned


def _file_mode() -> int:
    """0666 less the process's umask (read from /proc where it can be: setting it to read it races threads)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() gives a new file under this process's umask (read at import)


def settle_modes(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode a plainly created file gets (``FILE_MODE``): safetensors and
    temp files are created 0600, which would make a checkpoint's weights unreadable to those who can read the
    rest of it."""
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, FILE_MODE)


def write_atomic(path: str | Path, data: dict) -> Path:
    """Write ``data`` as strict JSON, as :func:`write_text_atomic` writes."""
    return write_text_atomic(path, json.dumps(strict_json(data), indent=2, sort_keys=True, ensure_ascii=False,
                                              allow_nan=False) + "\n")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, fsync it, then rename over ``path``.
    On any failure (a full disk) the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def make_record(status: str, config: dict, run_id: str, env: dict, metrics: dict | None = None,
                params: dict | None = None, error: str | None = None, extra: dict | None = None) -> dict:
    record = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": status,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "metrics": metrics or {},
        "params": params or {},
        "env": env,
    }
    if error is not None:
        record["error"] = error
    record.update(extra or {})
    return record


def error_text(exc: BaseException) -> str:
    """The one line a failed record and the command line give for ``exc``."""
    if isinstance(exc, DivergedError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


@dataclass
class RunPhase:
    """Where a run is: bad input found before it starts training leaves no record (see below)."""

    training: bool = False  # set by the run when its loop begins
    published: bool = False  # its outputs have replaced the last run's (pretraining's model/)


@contextmanager
def failed_record_on_error(path: Path, config: dict, run_id: str, env: dict, write: bool, extra: dict | None = None):
    """Write a failed record to ``path`` (if ``write``: the main process) when the block raises an exception;
    yields the :class:`RunPhase` the block updates.

    Bad input (:class:`PeftbenchError`: a config, data file or model the run cannot use) found before the run
    trains, and an interrupt (KeyboardInterrupt, SystemExit), leave no record: the run never ran, and is still to
    do once the input is mended. A ``PeftbenchError`` once training has begun is a failed run like any other.
    If the record cannot be written either (a full disk), the exception carries ``record_error`` saying why.
    """
    phase = RunPhase()
    try:
        yield phase
    except Exception as exc:
        if isinstance(exc, PeftbenchError) and not phase.training:
            raise
        if write:
            cut_short = {"interrupted": True} if isinstance(exc, Interrupted) else {}  # still to do for a sweep
            try:
                write_atomic(path, make_record("failed", config, run_id, env, error=error_text(exc),
                                               extra={**(extra or {}), **cut_short}))
            except OSError as write_exc:
                exc.record_error = f"{type(write_exc).__name__}: {write_exc}"
        raise


def validate(record: dict, source: str = "record") -> dict:
    """Check a record's schema; a success record must carry every required metric."""
    for key in ("schema_version", "run_id", "status", "config", "metrics", "params", "env"):
        if key not in record:
            raise PeftbenchError(f"{source}: field '{key}' missing")
    for key in ("config", "metrics", "params", "env"):
        if not isinstance(record[key], dict):
            raise PeftbenchError(f"{source}: field '{key}' is {type(record[key]).__name__}, not an object")
    if record["schema_version"] == 1:
        record = _upgrade_v1(record)
    if record["schema_version"] != SCHEMA_VERSION:
        raise PeftbenchError(f"{source}: field 'schema_version': {record['schema_version']} "
                             f"(expected {SCHEMA_VERSION})")
    if record["status"] not in ("success", "failed"):
        raise PeftbenchError(f"{source}: field 'status': {record['status']!r} (expected success or failed)")
    if record["status"] == "failed":
        if not record.get("error") or not isinstance(record["error"], str):
            raise PeftbenchError(f"{source}: field 'error' missing on a failed record (or not text)")
        return record
    for section, keys in REQUIRED.items():
        for key in keys:
            if key not in record[section]:
                raise PeftbenchError(f"{source}: field '{section}.{key}' missing")
    return record


def _upgrade_v1(record: dict) -> dict:
    """Version 1 records (classification only) scored accuracy: copy it into ``score``."""
    metrics = dict(record["metrics"])
    if "accuracy" in metrics:
        metrics.update(score=metrics["accuracy"], score_name="accuracy")
    if "test_accuracy" in metrics:
        metrics["test_score"] = metrics["test_accuracy"]
    return {**record, "metrics": metrics, "schema_version": 2}


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PeftbenchError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") \
            from None
    except json.JSONDecodeError as exc:
        raise PeftbenchError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise PeftbenchError(f"{path}: a record is a JSON object, not {type(record).__name__}")
    return validate(record, str(path))


def holds_success(folder: str | Path, name: str = RECORD_NAME) -> bool:
    """Whether ``folder`` holds a readable record (``name``: a fine-tuning one, checked as tables read it, or a
    pretraining one) of a successful run."""
    path = Path(folder) / name
    try:
        record = read_record(path) if name == RECORD_NAME else json.loads(path.read_text(encoding="utf-8"))
        return record["status"] == "success"
    except (OSError, ValueError, KeyError, TypeError, PeftbenchError):  # none, unreadable, not a record
        return False


def environment(num_processes: int = 1) -> dict:
    """Versions, hardware and code revision, recorded with every number."""
    env = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env.update(device="cuda", device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   cuda=torch.version.cuda)
    else:
        env.update(device="cpu", device_name=_cpu_name(), device_count=1)
    env.update(cpu_count=os.cpu_count(), cpu_capability=torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
               torch_threads=torch.get_num_threads(), num_processes=num_processes)
    env.update(_git_revision())
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _git_revision() -> dict:
    """The commit of the peftbench checkout this code runs from, if it is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return {"git_sha": None}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None}


@functools.lru_cache(maxsize=None)
def _defaults(method: str) -> dict:
    """A run's config at every default, for ``method`` (empty for a method this peftbench does not know)."""
    from peftbench.config import RunConfig
    from peftbench.registry import METHODS

    try:
        return RunConfig(method=METHODS.get(method, "method.name").Config()).to_dict()
    except PeftbenchError:
        return {}


def comparable_config(config: dict) -> dict:
    """A copy of a record's config without the keys added after records were first written (``LATER_KEYS``)
    where they hold their default: what run ids count, so that an older record compares with a newer one."""
    from peftbench.config import LATER_KEYS, drop_defaults

    config = json.loads(json.dumps(config))
    drop_defaults(config, _defaults(config["method"]["name"]), LATER_KEYS)
    return config


def later_train_keys() -> set[str]:
    """The ``train.*`` keys (their top-level names: ``distill``) added after records were first written."""
    from peftbench.config import LATER_KEYS

    return {key.split(".")[1] for key in LATER_KEYS if key.startswith("train.")}


def later_train_settings(config: dict) -> dict:
    """The ``train.*`` keys added after records were first written (training tricks: the schedule, ...) that
    ``config`` sets away from their defaults: what a leaderboard row names beside the method's settings."""
    from peftbench.config import LATER_KEYS, dotted

    train = comparable_config(config)["train"]
    later = [key.split(".", 1)[1] for key in LATER_KEYS if key.startswith("train.")]
    return {k: dotted(train, k) for k in later if dotted(train, k) is not None and k not in NOT_IDENTITY}
