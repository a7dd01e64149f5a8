"""Command line: ``peftbench run | sweep | pretrain | plan | leaderboard | predict | export | serve | tasks | methods``.

``peftbench run`` with no recipe and no ``method.name`` runs the built-in demo:
full fine-tuning and LoRA of the ``tiny`` backbone on the synthetic task, then a
comparison table. Also works as ``accelerate launch -m peftbench run ...``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from importlib.metadata import version
from pathlib import Path

from peftbench.errors import DivergedError, Interrupted, PeftbenchError, Stopped, one_line

# Per-method settings of the demo (over the defaults): a random-init backbone needs larger rates.
DEMO = {
    "full": {"method": {"name": "full"}, "train": {"lr": 5e-4}},
    "lora": {"method": {"name": "lora", "r": 8, "alpha": 16}, "train": {"lr": 5e-3}},
}
DEMO_BASE = {"task": {"name": "synthetic", "max_length": 64}, "model": {"name_or_path": "tiny"},
             "train": {"epochs": 4, "batch_size": 32}}


def _positive(text: str) -> int:
    """An option's whole number of at least 1 (argparse names the option when it is not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """A parser whose epilog (``keys``, a function) is made only when its help is shown: listing the config
    keys imports every method."""

    def __init__(self, *args, keys=None, **kwargs):
        super().__init__(*args, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.keys = keys

    def format_help(self) -> str:
        if self.keys is not None:
            self.epilog = self.keys()
        return super().format_help()


def _key_lines(rows: list[tuple[str, str, str, str]]) -> list[str]:
    if not rows:
        return ["  (no keys of its own)"]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"  {k:<{width[0]}}  {t:<{width[1]}}  {d:<{width[2]}}  {text}" for k, t, d, text in rows]


def _run_keys() -> str:
    from peftbench import config
    from peftbench.methods import get_method, method_names

    lines = ["keys, as key=value or in a YAML recipe (key, type, default, meaning; docs/recipes.md):", ""]
    lines += _key_lines(config.key_help(config.RunConfig) +
                        [("method.name", "str", "lora", "the method: " + ", ".join(method_names()))])
    for name in method_names():
        lines += ["", f"method.name={name} (docs/methods/{name}.md):"]
        lines += _key_lines([r for r in config.key_help(get_method(name).Config, "method.") if r[0] != "method.name"])
    return "\n".join(lines)


def _pretrain_keys() -> str:
    from peftbench import config
    from peftbench.pretrain import PretrainConfig

    return "\n".join(["keys, as key=value or in a YAML recipe (key, type, default, meaning; docs/pretraining.md):",
                      "", *_key_lines(config.key_help(PretrainConfig))])


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="peftbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run_p = sub.add_parser("run", help="train and evaluate one recipe (no recipe: the demo)", keys=_run_keys)
    run_p.add_argument("args", nargs="*", metavar="[RECIPE.yaml] [key=value ...]")
    sweep_p = sub.add_parser("sweep", help="run every cell of a sweep file (resumable, shardable)")
    sweep_p.add_argument("sweep_file")
    sweep_p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the sweep's base recipe")
    sweep_p.add_argument("--shard", default="0/1", help="i/N: run the i-th of N deterministic shares of the cells")
    sweep_p.add_argument("--retry-failed", action="store_true", help="rerun cells whose record says failed")
    sweep_p.add_argument("--dry-run", action="store_true", help="list the cells and their status, run nothing")
    sweep_p.add_argument("--max-cells", type=_positive, default=10_000,
                         help="refuse a grid of more cells (default 10000)")
    pre_p = sub.add_parser("pretrain", help="masked-LM pretraining (resumes an interrupted run in the same output_dir)",
                           keys=_pretrain_keys)
    pre_p.add_argument("args", nargs="*", metavar="[RECIPE.yaml] [key=value ...]")
    lb_p = sub.add_parser("leaderboard", help="tables (md/csv/html/json) and plots from result records")
    lb_p.add_argument("results", nargs="+", help="folders searched for record.json files")
    lb_p.add_argument("--out", required=True, help="output folder")
    lb_p.add_argument("--strict", action="store_true",
                      help="an unreadable record, or a cell pooling runs of other library versions, is an error")
    lb_p.add_argument("--model-index", action="store_true",
                      help="also model-index.yaml: each row's cell means as a model card's model-index entry")
    lb_p.add_argument("--reference", metavar="ROW",
                      help="a row's label: every other row of its table shows its difference to it, with a 95 %% "
                           "interval (default: each trick row against its method's plain row)")
    pred_p = sub.add_parser("predict", help="predict a split with a trained checkpoint")
    pred_p.add_argument("checkpoint", nargs="+", help="a run's checkpoint/ directory; several of one task: an "
                                                      "ensemble (their probabilities averaged)")
    pred_p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    pred_p.add_argument("--input", metavar="FILE", help="predict these texts instead of a split: plain text (one a "
                                                       "line), JSON lines or CSV with a 'text' field (pairs: "
                                                       "'text_a', 'text_b'), or - for standard input")
    pred_p.add_argument("--top-k", metavar="K", help="classification: also the K most probable labels with their "
                                                    "probabilities, sorted ('all': every label)")
    pred_p.add_argument("--data-dir", help="task folder (default: the one the checkpoint was trained on)")
    pred_p.add_argument("--out", required=True, help="output file (with --format clue: a file or a directory)")
    pred_p.add_argument("--format", default="jsonl", choices=["jsonl", "clue"],
                        help="jsonl: id, label, label_name, score; clue: CLUE submission lines")
    pred_p.add_argument("--batch-size", type=_positive, default=128)
    pred_p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    ens_p = sub.add_parser("ensemble", help="score several checkpoints of one task as one model and write its "
                                            "record (the leaderboard shows it as its own row)")
    ens_p.add_argument("checkpoints", nargs="+", help="checkpoint/ directories of one task")
    ens_p.add_argument("--out", required=True, help="output folder for record.json")
    ens_p.add_argument("--data-dir", help="task folder (default: the one the first checkpoint was trained on)")
    ens_p.add_argument("--batch-size", type=_positive, default=128)
    ens_p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    exp_p = sub.add_parser("export", help="a checkpoint as a standalone Hugging Face or ONNX model folder")
    exp_p.add_argument("checkpoint", help="a run's checkpoint/ directory")
    exp_p.add_argument("--out", required=True, help="output folder (new or empty)")
    exp_p.add_argument("--format", default="hf", choices=["hf", "onnx"],
                       help="hf: transformers weights (methods that merge or add nothing); onnx: model.onnx (every "
                            "method), checked with onnxruntime on the task's test split")
    exp_p.add_argument("--quantize", choices=["int8"], help="with --format onnx: also model.int8.onnx, its score "
                                                            "reported beside the float model's")
    exp_p.add_argument("--data-dir", help="task folder for the ONNX check (default: the one trained on)")
    srv_p = sub.add_parser("serve", help="serve checkpoints over HTTP: one base in memory, many adapters")
    srv_p.add_argument("checkpoints", nargs="*", metavar="[NAME=]CKPT", help="checkpoint/ directories (kept loaded)")
    srv_p.add_argument("--adapters-dir", help="a folder of checkpoints, each served by its folder name, loaded on "
                                              "first use")
    srv_p.add_argument("--max-loaded", type=int, help="adapters of --adapters-dir in memory at once (least "
                                                      "recently used let go; default: no limit)")
    srv_p.add_argument("--admin-token-file", help="file holding the admin endpoints' token (default: "
                                                  "$PEFTBENCH_ADMIN_TOKEN; none: no admin endpoints)")
    srv_p.add_argument("--host", default="127.0.0.1")
    srv_p.add_argument("--port", type=int, default=8000)
    srv_p.add_argument("--token-file", help="file holding the bearer token (default: $PEFTBENCH_TOKEN)")
    srv_p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    srv_p.add_argument("--max-batch", type=int, default=64, help="texts per forward pass")
    srv_p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    srv_p.add_argument("--max-texts", type=int, default=256, help="texts per request (more: 413)")
    srv_p.add_argument("--max-chars", type=int, default=2000, help="characters per text (more: 413)")
    srv_p.add_argument("--docs", action="store_true", help="also serve the OpenAPI pages (/docs, /redoc, "
                                                           "/openapi.json), which answer without the token")
    plan_p = sub.add_parser("plan", help="memory and speed of a recipe before running it, and what fits a budget",
                            keys=_run_keys)
    plan_p.add_argument("args", nargs="*", metavar="[RECIPE.yaml] [key=value ...]")
    plan_p.add_argument("--methods", help="comma list, or all (one per implementation; default: the recipe's method)")
    plan_p.add_argument("--memory", help="memory budget, e.g. 80GiB (default: the --device's memory)")
    plan_p.add_argument("--device", help="cpu, or a GPU: h200, h100, a100, a100-40gb, l4, a10, rtx4090, v100, t4 "
                                         "(default: this machine's device, its matmul rate measured now)")
    plan_p.add_argument("--processes", type=int, default=1, help="processes the run is launched with (per-process "
                                                                 "bytes; train.batch_size is per process)")
    plan_p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "zero2", "zero3"],
                        help="how the processes hold the model: whole (ddp), gradients and optimizer state split "
                             "(zero2), weights split too (fsdp, zero3)")
    sub.add_parser("tasks", help="list registered tasks")
    methods_p = sub.add_parser("methods", help="list registered methods")
    methods_p.add_argument("--all", action="store_true", help="also every tuner type of the installed PEFT "
                                                              "(method.name=peft) with its status per task kind")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "tasks":
            return _list_tasks()
        if ns.command == "methods":
            return _list_methods(ns.all)
        if ns.command == "leaderboard":  # reads records only: none of the model libraries
            from peftbench.leaderboard import write

            paths, skipped = write(ns.results, ns.out, ns.strict, ns.model_index, ns.reference)
            for reason in skipped:
                print(f"warning: skipped {reason}", file=sys.stderr)
            for path in paths:
                print(f"wrote {path}")
            return 0
        _quiet_libraries()
        if ns.command in ("sweep", "pretrain", "run"):
            _stop_on_sigterm()
        if ns.command == "sweep":
            return _sweep(ns)
        if ns.command == "pretrain":
            return _pretrain(ns.args)
        if ns.command == "export":
            from peftbench.export import export

            out = export(ns.checkpoint, ns.out, ns.format, ns.quantize, ns.data_dir)
            print(f"model: {out}")
            if ns.format == "onnx":
                print(_export_summary(out))
            return 0
        if ns.command == "serve":
            from peftbench.serve import Limits, serve

            serve(ns.checkpoints, ns.host, ns.port, ns.token_file, ns.device or ("cuda" if _cuda() else "cpu"),
                  Limits(ns.max_texts, ns.max_chars), ns.max_batch, ns.max_wait_ms, ns.docs, ns.adapters_dir,
                  ns.max_loaded, ns.admin_token_file)
            return 0
        if ns.command == "plan":
            return _plan(ns)
        if ns.command == "ensemble":
            from peftbench.ensemble import evaluate

            record = evaluate(ns.checkpoints, ns.out, ns.data_dir, ns.batch_size, ns.device or
                              ("cuda" if _cuda() else "cpu"))
            m = record["metrics"]
            test = f", test {m['test_score']:.4f}" if "test_score" in m else ""
            print(f"ensemble of {len(ns.checkpoints)}: dev {m['score_name']} {m['score']:.4f}{test}; record: "
                  f"{Path(ns.out) / 'record.json'}")
            return 0
        if ns.command == "predict":
            from peftbench.inference import predict

            device = ns.device or ("cuda" if _cuda() else "cpu")
            out = predict(ns.checkpoint, ns.split, ns.data_dir, ns.out, ns.format, ns.batch_size, device, ns.input,
                          _top_k(ns.top_k))
            print(f"predictions: {out}")
            return 0
        return _run(ns.args)
    except PeftbenchError as exc:
        _traceback_if_debugging()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except (DivergedError, OSError) as exc:  # expected failures outside a run (a full disk, a lost file)
        _traceback_if_debugging()
        print(f"error: {one_line(f'{type(exc).__name__}: {exc}')}", file=sys.stderr)
        return 1
    except Interrupted as exc:  # a sweep cut short from outside: its cell's record says so
        _traceback_if_debugging()
        print(f"error: {one_line(exc)}; the cell's record is marked interrupted, and the sweep runs it again when "
              "resumed", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Stopped) else 1


def _top_k(value: str | None) -> int | None:
    """``--top-k``: absent 0 (the top label only), ``all`` None, else K >= 1."""
    if value is None:
        return 0
    if value == "all":
        return None
    if value.isdecimal() and value.isascii() and int(value) >= 1:
        return int(value)
    raise PeftbenchError(f"--top-k must be a number >= 1 or all, got {value!r}")


def _export_summary(out) -> str:
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


def _traceback_if_debugging() -> None:
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
        _traceback_if_debugging()
    else:
        traceback.print_exc()
    note = getattr(exc, "record_error", None)
    where = f"the earlier successful run in {out_dir} is kept" if getattr(exc, "kept_success", False) else \
        f"the failed record could not be written: {note}" if note else f"failed record in {out_dir}"
    print(f"error: {one_line(f'run failed: {error_text(exc)} ({where})')}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep progress output to peftbench's own training bar."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _reported(job, cfg):
    """``job(cfg)``; a run that fails (not bad input: that raises) is reported in one line and gives None."""
    try:
        return job(cfg)
    except PeftbenchError:
        raise
    except Exception as exc:
        report_failed_run(exc, cfg.output_dir)
        return None


def _recipe_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE.yaml] [key=value ...]``: the recipe when the first argument is not an override."""
    return (args[0], args[1:]) if args and "=" not in args[0] else (None, args)


def _plan(ns) -> int:
    from peftbench import config
    from peftbench.methods import method_names
    from peftbench.plan import format_plan, parse_bytes, plan

    cfg = config.load(*_recipe_and_overrides(ns.args))
    methods = (method_names(presets=False) if ns.methods == "all" else ns.methods.split(",") if ns.methods
               else [cfg.method.name])
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise PeftbenchError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(method_names())})")
    budget = parse_bytes(ns.memory) if ns.memory else None
    print(format_plan(plan(cfg, methods, ns.device, budget, ns.processes, ns.strategy)))
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a launcher stopping every process because one failed, a scheduler ending the job) raises
    :class:`Stopped` in the main thread: the run writes its failed record saying so and exits non-zero. A signal
    that lands while a failure is being handled leaves that failure to be recorded."""

    def stop(signum, frame):
        if sys.exc_info()[1] is not None:  # already failing (a lost process, most often): that failure is recorded
            return
        raise Stopped(f"stopped by {signal.Signals(signum).name} (a launcher stops every process when one of them "
                      "fails; a scheduler stops a job)")

    signal.signal(signal.SIGTERM, stop)


def _run(args: list[str]) -> int:
    from peftbench import config
    from peftbench.loop import process_state
    from peftbench.train import run

    recipe, args = _recipe_and_overrides(args)
    overrides = config.parse_overrides(args)
    if recipe is None and "name" not in overrides.get("method", {}):
        cfgs = [config.load(None, args, base=config.merge(DEMO_BASE, DEMO[name])) for name in DEMO]
        for cfg in cfgs:  # one folder per method (inside output_dir when given)
            cfg.output_dir = str(Path(cfg.output_dir or "runs/demo") / cfg.method.name)
    else:
        cfgs = [config.load(recipe, args)]
        named = config.merge(config.read_recipe(recipe) if recipe else {}, overrides)
        if "name_or_path" not in named.get("model", {}) and process_state(cfgs[0].train.dist_timeout).is_main_process:
            print(f"backbone: {cfgs[0].model.name_or_path}, random init (no model.name_or_path given): the scores test "
                  "the machinery, not the method")
    records = []
    for cfg in cfgs:
        result = _reported(run, cfg)
        if result is None:
            return 1
        records.append(result.record)
    from peftbench.leaderboard import run_summary

    if process_state().is_main_process:
        print(run_summary(records))
        for cfg in cfgs:
            print(f"record: {Path(cfg.output_dir) / 'record.json'}")
    return 0


def _pretrain(args: list[str]) -> int:
    from peftbench.loop import process_state
    from peftbench.pretrain import describe_reference, load_config, pretrain
    from peftbench.records import PRETRAIN_RECORD_NAME

    cfg = load_config(*_recipe_and_overrides(args))
    record = _reported(pretrain, cfg)
    if record is None:
        return 1
    m = record["metrics"]
    if process_state().is_main_process:
        print(f"MLM loss {m['mlm_loss']:.4f} (perplexity {m['mlm_perplexity']:.1f}) after {m['steps']} steps "
              f"({m['stopped_by']}), {m['train_tokens_per_s']:.0f} tokens/s, peak {m['peak_memory_mb']:.0f} MB")
        print(f"model: {Path(cfg.output_dir) / 'model'}")
        if "reference" in record:
            print(describe_reference(record["reference"]))
        print(f"record: {Path(cfg.output_dir) / PRETRAIN_RECORD_NAME}")
    return 0


def _sweep(ns) -> int:
    from peftbench import config, sweep
    from peftbench.leaderboard import run_summary
    from peftbench.loop import process_state

    spec = sweep.read_sweep(ns.sweep_file)
    timeout = config.merge(spec["recipe"], config.parse_overrides(ns.overrides)).get("train", {}).get("dist_timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 1):  # read before any cell's config is
        raise PeftbenchError(f"{ns.sweep_file}: config key 'train.dist_timeout' must be >= 1 (seconds), got "
                             f"{timeout!r}")
    main = process_state(*[timeout] if timeout else []).is_main_process
    board = sweep.board(spec) if main else None  # only the main process claims cells
    if main:
        print(f"{ns.sweep_file}: {sweep.count_cells(spec):,} grid cells", flush=True)
    shard = [f"--shard {ns.shard}"] if ns.shard != "0/1" else []
    provenance = {"sweep_file": ns.sweep_file,
                  "command": " ".join(["peftbench", "sweep", ns.sweep_file, *ns.overrides, *shard])}
    reuse = sweep.reusable(spec["reuse"]) if main else {}
    waiting, no_final = [], []
    if "search" in spec or "final" in spec:
        from peftbench import search

        spec = search.read_sweep(ns.sweep_file)
        studies = search.studies(spec, ns.overrides, sweep.parse_shard(ns.shard), ns.max_cells)
        if main:
            print(f"{len(studies)} studies in this shard ({spec['search'].trials} learning rates each), "
                  f"results in {spec['output_dir']}")
        if ns.dry_run:
            print("\n".join(search.describe(studies, spec["search"], board, reuse, ns.retry_failed)))
            return 0
        outcome, waiting, no_final = search.run_search(studies, spec["search"], ns.retry_failed,
                                                       provenance=provenance, board=board, reuse=reuse)
    else:
        cells = sweep.plan(sweep.expand(spec, ns.overrides, ns.max_cells), sweep.parse_shard(ns.shard), board)
        todo = [c for c in cells if c.status != "success" and (c.status is None or ns.retry_failed)]
        if main:
            print(f"{len(cells)} cells in this shard, {len(todo)} to run, results in {spec['output_dir']}")
        if ns.dry_run:
            for c in cells:
                task, method, seed = c.cfg.task.name, c.cfg.method.name, c.cfg.train.seed
                status = c.status or ("to reuse" if c.run_id in reuse else "to do")
                print(f"{c.run_id}  {task:<12} {method:<8} seed {seed:<4} {status}")
            return 0
        outcome = sweep.run_sweep(cells, ns.retry_failed, provenance=provenance, board=board, reuse=reuse)
    if main:
        print(run_summary([r for r in outcome.records if r["status"] == "success"]))
        for r in outcome.records:
            if r["status"] == "failed":
                print(f"failed: {r['run_id']} {r['error']}")
        for study in waiting:
            print(f"{study}: its last trials run in another worker, which runs its final seeds")
        for study in no_final:
            print(f"{study}: every trial failed: no final runs")
        print(outcome.summary())
    return 1 if outcome.failed or outcome.refused or no_final else 0


def _list_tasks() -> int:
    from peftbench.tasks import describe_task, task_names

    for name in task_names():
        print(describe_task(name))
    return 0


def _list_methods(every_tuner: bool = False) -> int:
    from peftbench.methods import get_method, method_names

    width = max(map(len, method_names()))
    for name in method_names():
        cls = get_method(name)
        print(f"{name:<{width}} {(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
    if every_tuner:
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


if __name__ == "__main__":
    raise SystemExit(main())
