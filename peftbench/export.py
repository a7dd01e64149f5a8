"""``peftbench export``: a trained checkpoint as a standalone Hugging Face model folder.

The folder holds a plain transformers model (LoRA-family updates merged into the
weights; BitFit's biases are ordinary weights), its tokenizer and config with the
label names, and nothing peftbench-specific: ``AutoModelForSequenceClassification``
(or ``...TokenClassification``) and ``AutoTokenizer`` load it with no peftbench
installed. Methods that add modules transformers does not have (bottleneck
adapters, prefix and prompt tuning) are refused with the alternatives.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from peftbench import checkpoint
from peftbench.errors import PeftbenchError
from peftbench.inference import load
from peftbench.methods import get_method, method_names


def export(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the model of ``ckpt_dir`` to ``out_dir`` as a plain Hugging Face folder; returns ``out_dir``."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    meta = checkpoint.read_meta(ckpt_dir)
    method = get_method(meta["method"])
    if not method.plain_model:
        plain = ", ".join(n for n in method_names() if get_method(n).plain_model)
        raise PeftbenchError(f"method '{meta['method']}' adds modules transformers does not have, so it cannot be a "
                             f"plain Hugging Face model (methods that can: {plain}); load it with peftbench.load")
    quantization = meta["config"]["model"]["quantization"]
    if quantization != "none":
        raise PeftbenchError(f"{ckpt_dir}: trained on a {quantization} base; merged into float weights it would "
                             "not be the model that was trained: load it with peftbench.load")
    model, tokenizer, _ = load(ckpt_dir)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PeftbenchError(f"--out {out_dir}: not empty; export writes a folder of its own")
    stage = out_dir.with_name(f".{out_dir.name}.export")
    shutil.rmtree(stage, ignore_errors=True)
    model.save_pretrained(str(stage))
    tokenizer.save_pretrained(str(stage))
    if out_dir.exists():
        out_dir.rmdir()
    stage.rename(out_dir)
    return out_dir
