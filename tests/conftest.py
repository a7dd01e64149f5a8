import json
import os
from pathlib import Path

import datasets
import pytest

datasets.disable_progress_bars()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_CLUE = Path(__file__).resolve().parents[2] / "shared" / "clue"
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
    return ["task.name=synthetic", "model.name_or_path=tiny", "task.max_length=48", f"output_dir={tmp_path / 'run'}"]


RELOAD_SCRIPT = """
import json, sys, torch, peftbench
ckpts, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, ckpt in ckpts.items():
    model, tok, meta = peftbench.load(ckpt)
    with torch.no_grad():
        out[name] = model(**tok(texts, padding=True, return_tensors="pt")).logits
torch.save(out, sys.argv[3])
"""


def logits_in_new_process(ckpts: dict, texts: list[str], tmp_path: Path) -> dict:
    """Reload each checkpoint with ``peftbench.load`` in a fresh Python process; return its logits on ``texts``."""
    import subprocess
    import sys

    import torch

    out = tmp_path / "reloaded_logits.pt"
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(ckpts), json.dumps(texts), str(out)], check=True)
    return torch.load(out)


def logits_here(result, texts: list[str]):
    """Logits of a run's trained model (``RunResult``) on ``texts``."""
    import torch

    with torch.no_grad():
        return result.model.eval()(**result.tokenizer(texts, padding=True, return_tensors="pt")).logits


def torchrun(nproc: int, *args: str, cwd=None):
    """``python -m torch.distributed.run --nproc_per_node N -m peftbench ARGS``: a gloo group on CPU."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m",
                           "peftbench", *args], capture_output=True, text=True, env=env, cwd=cwd)
