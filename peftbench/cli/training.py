"""The commands that train: run, pretrain, sweep, and plan (what a run would need)."""

from __future__ import annotations

from pathlib import Path

from peftbench.cli.failures import reported
from peftbench.errors import PeftbenchError

# Per-method settings of the demo (over the defaults): a random-init backbone needs larger rates.
DEMO = {
    "full": {"method": {"name": "full"}, "train": {"lr": 5e-4}},
    "lora": {"method": {"name": "lora", "r": 8, "alpha": 16}, "train": {"lr": 5e-3}},
}
DEMO_BASE = {"task": {"name": "synthetic", "max_length": 64}, "model": {"name_or_path": "tiny"},
             "train": {"epochs": 4, "batch_size": 32}}


def recipe_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """``[RECIPE.yaml] [key=value ...]``: the recipe when the first argument is not an override."""
    return (args[0], args[1:]) if args and "=" not in args[0] else (None, args)


def plan_recipe(ns) -> int:
    """``peftbench plan [RECIPE.yaml] [key=value ...]``: memory and speed before a run, and what fits a budget."""
    from peftbench import config
    from peftbench import plan as planning
    from peftbench.methods import method_names

    cfg = config.load(*recipe_and_overrides(ns.args))
    methods = (method_names(presets=False) if ns.methods == "all" else ns.methods.split(",") if ns.methods
               else [cfg.method.name])
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        raise PeftbenchError(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(method_names())})")
    budget = planning.parse_bytes(ns.memory) if ns.memory else None
    print(planning.format_plan(planning.plan(cfg, methods, ns.device, budget, ns.processes, ns.strategy)))
    return 0


def run_recipe(ns) -> int:
    """``peftbench run [RECIPE.yaml] [key=value ...]``; no recipe and no method: the demo."""
    from peftbench import config, train
    from peftbench.loop import process_state

    recipe, args = recipe_and_overrides(ns.args)
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
        result = reported(train.run, cfg)
        if result is None:
            return 1
        records.append(result.record)
    from peftbench.leaderboard import run_summary

    if process_state().is_main_process:
        print(run_summary(records))
        for cfg in cfgs:
            print(f"record: {Path(cfg.output_dir) / 'record.json'}")
    return 0


def run_pretraining(ns) -> int:
    """``peftbench pretrain [RECIPE.yaml] [key=value ...]``."""
    from peftbench import pretrain as pretraining
    from peftbench.loop import process_state
    from peftbench.records import PRETRAIN_RECORD_NAME

    cfg = pretraining.load_config(*recipe_and_overrides(ns.args))
    record = reported(pretraining.pretrain, cfg)
    if record is None:
        return 1
    m = record["metrics"]
    if process_state().is_main_process:
        print(f"MLM loss {m['mlm_loss']:.4f} (perplexity {m['mlm_perplexity']:.1f}) after {m['steps']} steps "
              f"({m['stopped_by']}), {m['train_tokens_per_s']:.0f} tokens/s, peak {m['peak_memory_mb']:.0f} MB")
        print(f"model: {Path(cfg.output_dir) / 'model'}")
        if "reference" in record:
            print(pretraining.describe_reference(record["reference"]))
        print(f"record: {Path(cfg.output_dir) / PRETRAIN_RECORD_NAME}")
    return 0


def run_sweep_file(ns) -> int:
    """``peftbench sweep SWEEP.yaml``: its grid, or its searches and final seeds."""
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
