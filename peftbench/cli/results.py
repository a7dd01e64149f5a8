"""The commands that read or use results: leaderboard, predict, ensemble, export, serve, and the listings of tasks
and methods."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

from peftbench.errors import PeftbenchError


def leaderboard(ns) -> int:
    """Tables and plots from records (reads records only: none of the model libraries)."""
    from peftbench.leaderboard import write

    paths, skipped = write(ns.results, ns.out, ns.strict, ns.model_index, ns.reference)
    for reason in skipped:
        print(f"warning: skipped {reason}", file=sys.stderr)
    for path in paths:
        print(f"wrote {path}")
    return 0


def predict(ns) -> int:
    from peftbench.inference import predict

    out = predict(ns.checkpoint, ns.split, ns.data_dir, ns.out, ns.format, ns.batch_size, device(ns), ns.input,
                  top_k(ns.top_k))
    print(f"predictions: {out}")
    return 0


def ensemble(ns) -> int:
    from peftbench.ensemble import evaluate

    record = evaluate(ns.checkpoints, ns.out, ns.data_dir, ns.batch_size, device(ns))
    m = record["metrics"]
    test = f", test {m['test_score']:.4f}" if "test_score" in m else ""
    print(f"ensemble of {len(ns.checkpoints)}: dev {m['score_name']} {m['score']:.4f}{test}; record: "
          f"{Path(ns.out) / 'record.json'}")
    return 0


def export(ns) -> int:
    from peftbench.export import export

    out = export(ns.checkpoint, ns.out, ns.format, ns.quantize, ns.data_dir)
    print(f"model: {out}")
    if ns.format == "onnx":
        print(export_summary(out))
    return 0


def serve(ns) -> int:
    from peftbench.serve import Limits, serve

    serve(ns.checkpoints, ns.host, ns.port, ns.token_file, device(ns), Limits(ns.max_texts, ns.max_chars),
          ns.max_batch, ns.max_wait_ms, ns.docs, ns.adapters_dir, ns.max_loaded, ns.admin_token_file)
    return 0


def device(ns) -> str:
    """``--device``, or cuda when there is one."""
    if ns.device:
        return ns.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def top_k(value: str | None) -> int | None:
    """``--top-k``: absent 0 (the top label only), ``all`` None, else K >= 1."""
    if value is None:
        return 0
    if value == "all":
        return None
    if value.isdecimal() and value.isascii() and int(value) >= 1:
        return int(value)
    raise PeftbenchError(f"--top-k must be a number >= 1 or all, got {value!r}")


def export_summary(out) -> str:
    import json

    from peftbench.export import REPORT_FILE

    report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    check, scores = report["check"], report["scores"]
    line = (f"checked on {check['records']} {check['split']} records: max |logit diff| "
            f"{check['max_abs_logit_diff']:.1e}; {scores['metric']} peftbench {scores['peftbench']:.4f}, "
            f"onnx {scores['onnx']:.4f}")
    if "onnx_int8" in scores:
        line += f", onnx int8 {scores['onnx_int8']:.4f} (drop {scores['int8_drop']:+.4f})"
    return line


def list_tasks(ns) -> int:
    from peftbench.tasks import describe_task, task_names

    for name in task_names():
        print(describe_task(name))
    return 0


def list_methods(ns) -> int:
    from peftbench.methods import get_method, method_names

    width = max(map(len, method_names()))
    for name in method_names():
        cls = get_method(name)
        print(f"{name:<{width}} {(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
    if ns.all:
        from peftbench.methods.peft_tuner import KINDS, peft_types, status

        types = peft_types()
        print(f"\nmethod.name=peft method.peft_type=TYPE: the {len(types)} tuner types of PEFT {version('peft')} "
              "(tested: by tests/test_tuners.py)")
        print(f"{'TYPE':<24}  {KINDS[0]:<14}  {KINDS[1]:<20}  why refused")
        for t in types:
            cells = [status(t, k) for k in KINDS]
            reasons = dict.fromkeys(c.removeprefix("refused: ") for c in cells if c.startswith("refused"))
            shown = [c.split(":")[0] for c in cells]
            print(f"{t:<24}  {shown[0]:<14}  {shown[1]:<20}  {'; '.join(reasons)}".rstrip())
    return 0
