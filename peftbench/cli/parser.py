"""The parser of every command and its options."""

from __future__ import annotations

import argparse


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


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every command with its options; ``peftbench COMMAND --help`` lists a recipe's keys."""
    parser = _Parser(prog="peftbench", description=description)
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
    return parser
