import json
import os
import random
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one torch thread per test worker (and the processes it starts):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two workers on two cores, not four threads fighting

import datasets  # noqa: E402
import pytest  # noqa: E402

datasets.disable_progress_bars()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_MODELS = {  # a fixture of trained models -> its group: one worker trains it once
    "trained_variants": "variants", "ner_runs": "ner", "sharded": "engines", "smoke": "smoke", "int8_runs": "int8",
    "zoo": "zoo", "eager_run": "eager", "one_process": "engines"}
# a test that needs one of these is slow
SLOW_FIXTURES = ("ner_runs", "zoo", "int8_runs", "sharded", "zh_mini_tasks", "folder_server")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Tests that share a fixture of trained models run in one worker (``--dist loadgroup``): the models are
    trained once. Tests that need a slow fixture are marked slow (``-m "not slow"`` leaves them out)."""
    for item in items:
        group = next((g for name, g in SHARED_MODELS.items() if name in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if any(name in item.fixturenames for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


SHARED_CLUE = Path(__file__).resolve().parents[2] / "shared" / "clue"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmark scripts are importable
needs_shared_clue = pytest.mark.skipif(not SHARED_CLUE.is_dir(), reason="../shared/clue is not present")


def write_jsonl(path: Path, records, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + newline)
    return path


def fewclue_dir(root: Path, train, dev, test=None, newline: str = "\n") -> Path:
    """A FewCLUE-layout folder with the given record lists."""
    write_jsonl(root / "train_few_all.json", train, newline)
    write_jsonl(root / "dev_few_all.json", dev, newline)
    if test is not None:
        write_jsonl(root / "test_public.json", test, newline)
    return root


@pytest.fixture
def quick_overrides(tmp_path):
    """Overrides for a small, fast run of the tiny backbone on the synthetic task."""
    return ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48", "train.measure_inference=false",
            f"output_dir={tmp_path / 'run'}"]


RELOAD_SERVER = """
import json, sys, traceback, torch, peftbench
for line in sys.stdin:
    request = json.loads(line)
    try:
        out = {}
        for name, ckpt in request["ckpts"].items():
            model, tok, meta = peftbench.load(ckpt)
            with torch.no_grad():
                out[name] = model(**tok(request["texts"], padding=True, return_tensors="pt")).logits
        torch.save(out, request["out"])
        print("RELOADED ok", flush=True)
    except Exception:
        print("RELOADED " + json.dumps(traceback.format_exc()), flush=True)
"""
_reloader = None


def logits_in_new_process(ckpts: dict, texts: list[str], tmp_path: Path) -> dict:
    """Reload each checkpoint with ``peftbench.load`` in another Python process, one that has trained nothing
    (started once per test session and reused: each start costs seconds of imports); return its logits."""
    import atexit
    import subprocess
    import sys

    import torch

    global _reloader
    if _reloader is None or _reloader.poll() is not None:
        _reloader = subprocess.Popen([sys.executable, "-c", RELOAD_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        atexit.register(_reloader.stdin.close)
    out = tmp_path / "reloaded_logits.pt"
    _reloader.stdin.write(json.dumps({"ckpts": {k: str(v) for k, v in ckpts.items()}, "texts": texts,
                                      "out": str(out)}) + "\n")
    _reloader.stdin.flush()
    answer = ""
    while not answer.startswith("RELOADED "):  # libraries may print to stdout too
        answer = _reloader.stdout.readline()
        assert answer, "the reloading process died"
    answer = answer.removeprefix("RELOADED ").strip()
    assert answer == "ok", json.loads(answer)
    return torch.load(out)


def logits_here(result, texts: list[str]):
    """Logits of a run's trained model (``RunResult``) on ``texts``."""
    import torch

    with torch.no_grad():
        return result.model.eval()(**result.tokenizer(texts, padding=True, return_tensors="pt")).logits


def accelerate_launch(*args: str, cwd=None, wait=True):
    """``accelerate launch ARGS`` as a user types it (``-m peftbench ...`` among ``args``); with ``wait=False``
    the started process."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    argv = [str(Path(sys.executable).parent / "accelerate"), "launch", *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="session")
def still_tiny(tmp_path_factory):
    """The tiny BERT with its dropout off, saved as a model folder with its tokenizer: several processes draw
    other dropout masks than one, so runs that must agree to 1e-5 use it."""
    import torch
    from transformers import BertForSequenceClassification

    from peftbench import models
    from peftbench.tasks.synthetic import generate_splits

    folder = tmp_path_factory.mktemp("tiny-no-dropout")
    tokenizer = models.char_tokenizer([r["sentence"] for r in generate_splits()["train"]])
    cfg = models.random_init_config("tiny", len(tokenizer))
    cfg.update({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "num_labels": 4,
                "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def same_steps(backbone, method: str, *extra: str) -> list[str]:
    """Overrides of a short run on ``backbone`` whose every step is logged; with ``train.batch_size=8`` on two
    processes, or with ``train.grad_accum_steps=2`` on one, each step sees the same 16 examples."""
    return [f"model.name_or_path={backbone}", f"method.name={method}", "task.name=synthetic", "task.max_length=32",
            "task.max_train_samples=320", "train.max_steps=10", "train.log_every=1", "train.warmup_ratio=0",
            "train.measure_inference=false", "train.evaluate_test=false", "train.batch_size=8", *extra]


# Cells that run under each engine (tests/test_fsdp.py, tests/test_launch.py), each against the same run in one process
NO_DROPOUT = {"dropout": 0.0}  # the LoRA family's own dropout: two processes draw other masks than one
FLOAT_CELLS = {  # name -> overrides merged into the recipe; dropout off, one learning rate that moves each in 10 steps
    "lora": {"method": {"name": "lora", **NO_DROPOUT}, "train": {"lr": 5e-3}},
    "lora-dora": {"method": {"name": "lora", "use_dora": True, **NO_DROPOUT}, "train": {"lr": 5e-3}},
    "lora-rslora": {"method": {"name": "lora", "use_rslora": True, **NO_DROPOUT}, "train": {"lr": 5e-3}},
    "adalora": {"method": {"name": "adalora", **NO_DROPOUT}, "train": {"lr": 1e-2}},
    "adapter": {"method": {"name": "adapter"}, "train": {"lr": 5e-3}},
    "adapter-pfeiffer": {"method": {"name": "adapter", "variant": "pfeiffer"}, "train": {"lr": 5e-3}},
    "prefix": {"method": {"name": "prefix"}, "train": {"lr": 1e-2}},
    "prompt": {"method": {"name": "prompt"}, "train": {"lr": 3e-2}},
    "ia3": {"method": {"name": "ia3"}, "train": {"lr": 1e-2}},
    "bitfit": {"method": {"name": "bitfit"}, "train": {"lr": 1e-2}},
    "full": {"method": {"name": "full"}, "train": {"lr": 5e-4}},
}
BF16_CELL = {"lora-bf16": {**FLOAT_CELLS["lora"], "train": {"lr": 5e-3, "mixed_precision": "bf16"}}}
QUANTIZED = {"4bit": {"quantization": "4bit", "quant_4bit_compute_dtype": "fp32"}, "8bit": {"quantization": "8bit"}}


def quantized_cells(bits: str, names=None) -> dict:
    """The float cells (but full, which a quantised base refuses) on a quantised base: ``name-4bit`` -> tree."""
    return {f"{name}-{bits}": {**tree, "model": QUANTIZED[bits]} for name, tree in FLOAT_CELLS.items()
            if name != "full" and (names is None or name in names)}


def cell_overrides(tree: dict, prefix: str = "") -> list[str]:
    return [item for key, value in tree.items() for item in
            (cell_overrides(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}={value}"])]


def engine_recipe(backbone) -> list[str]:
    """Cells under an engine: checkpointed inside each layer; 80 examples, 5 steps an epoch, so training goes on
    after an evaluation; the test split scored too."""
    return same_steps(backbone, "lora", "train.gradient_checkpointing=true", "task.max_train_samples=80",
                      "train.evaluate_test=true")


def is_cell(record: dict, tree: dict) -> bool:
    """The record ran these overrides and no other method or model setting (or precision) away from its default."""
    precision = tree.get("train", {}).get("mixed_precision", "no")
    ran = all(record["config"][section].get(key) == value for section, values in tree.items()
              for key, value in values.items())
    return ran and record["config"]["train"]["mixed_precision"] == precision and \
        all(set(record["settings"][section]) <= set(tree.get(section, {})) for section in ("method", "model"))


@pytest.fixture(scope="session")
def one_process(still_tiny, tmp_path_factory):
    """``reference(name, tree)``: the record of the cell in one process taking each step as two micro-batches
    (trained once)."""
    from peftbench import config
    from peftbench.train import run

    root, done = tmp_path_factory.mktemp("one"), {}

    def reference(name: str, tree: dict) -> dict:
        if name not in done:
            done[name] = run(config.load(None, [*engine_recipe(still_tiny), *cell_overrides(tree),
                                                "train.grad_accum_steps=2", f"output_dir={root / name}"])).record
        return done[name]
    return reference


def torchrun(nproc: int, *args: str, cwd=None):
    """``python -m torch.distributed.run --nproc_per_node N -m peftbench ARGS``: a gloo group on CPU."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m",
                           "peftbench", *args], capture_output=True, text=True, env=env, cwd=cwd)


# Every method on the tiny backbone and the synthetic task, trained once per test session and shared by
# test_methods (every variant), test_train (full, LoRA) and test_quantization (the learning rates).
CHANCE = 0.25
# Learning rates for the random-init tiny backbone (variants share their method's rate).
LR = {"full": 5e-4, "lora": 5e-3, "adalora": 1e-2, "adapter": 5e-3, "prefix": 1e-2, "prompt": 3e-2, "ia3": 1e-2,
      "bitfit": 1e-2, "peft": 5e-3}
LONGER = ["task.max_train_samples=null", "train.batch_size=32", "train.epochs=3"]  # 96 steps over 1000 examples
VARIANTS = {  # name -> overrides: method settings, and a longer run for prefix's reparameterised prompt
    "full": [], "lora": [], "lora-rslora": ["method.use_rslora=true"], "lora-dora": ["method.use_dora=true"],
    "adalora": [], "adapter": [], "adapter-pfeiffer": ["method.variant=pfeiffer"], "prefix": LONGER,
    "prefix-no-mlp": ["method.reparameterize=false"], "prompt": [], "ia3": [], "bitfit": [],
    "peft": ["method.peft_type=LOHA"],  # the bridge to every PEFT tuner, with one that is not LoRA
}


def variant_config(variant, out_dir, *extra):
    from peftbench import config

    method = variant.split("-")[0]
    return config.load(None, ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48",
                              "task.max_train_samples=320", "train.batch_size=16", "train.epochs=4",  # 80 steps
                              f"method.name={method}", f"train.lr={LR[method]}", f"output_dir={out_dir}",
                              *VARIANTS[variant], *extra])


@pytest.fixture(scope="session")
def trained_variants(tmp_path_factory):
    from peftbench.train import run

    return {v: run(variant_config(v, tmp_path_factory.mktemp(v))) for v in VARIANTS}


# Every method on the synthetic NER task (test_ner; a LoRA run is served by test_serve).
NER_SETTINGS = {"full": ["train.lr=1e-3", "train.epochs=3"], "lora": ["train.lr=1e-2"],
                "adalora": ["train.lr=3e-2", "train.epochs=8"],
                "adapter": ["train.lr=1e-2", "method.bottleneck=64"], "prefix": ["train.lr=3e-3"],
                "prompt": ["train.lr=5e-2"], "ia3": ["train.lr=3e-2"], "bitfit": ["train.lr=5e-2", "train.epochs=10"]}
NER_ARGS = ["task.name=synthetic_ner", "task.max_length=40", "train.epochs=6"]


@pytest.fixture(scope="session")
def ner_runs(tmp_path_factory):
    from peftbench import config
    from peftbench.train import run

    root = tmp_path_factory.mktemp("ner")
    out = {}
    for method, settings in NER_SETTINGS.items():
        cfg = config.load(None, [*NER_ARGS, f"method.name={method}", *settings, "train.batch_size=16",
                                 "train.measure_inference=false", f"output_dir={root / method}"])
        out[method] = run(cfg)
    return out


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """Checkpoints shaped like hub releases (tests/zoo.py): name -> local directory."""
    from zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


def tensorboard_scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files in ``event_dir``, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


TNEWS = {"100": "故事", "101": "文化", "102": "娱乐", "103": "体育", "104": "财经", "106": "房产", "107": "汽车",
         "108": "教育", "109": "科技", "110": "军事", "112": "旅游", "113": "国际", "114": "股票", "115": "农业",
         "116": "电竞"}


def tnews_folder(root: Path) -> Path:
    """TNEWS in CLUE's layout: each class writes titles from its own characters (so a model can learn it); the
    test split is unlabeled, as CLUE ships it."""
    rng = random.Random(0)
    pool = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
    words = {code: pool[i * 3:i * 3 + 6] for i, code in enumerate(TNEWS)}
    root.mkdir(parents=True)
    for split, n in (("train", 300), ("dev", 90), ("test", 60)):
        with (root / f"{split}.json").open("w", encoding="utf-8") as fh:
            for i in range(n):
                code = list(TNEWS)[i % len(TNEWS)]
                title = "".join(rng.choice(words[code]) for _ in range(rng.randint(8, 20)))
                row = {"sentence": title, "keywords": "", "id": i}
                if split != "test":
                    row = {"label": code, "label_desc": f"news_{TNEWS[code]}", **row}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return root
