"""``peftbench export``: a trained checkpoint as a standalone model folder, Hugging Face or ONNX.

``fmt="hf"``: a plain transformers model (LoRA-family updates merged into the weights;
BitFit's biases are ordinary weights), its tokenizer and config with the label names,
and nothing peftbench-specific: ``AutoModelForSequenceClassification`` (or
``...TokenClassification``) and ``AutoTokenizer`` load it with no peftbench installed.
Methods that add modules transformers does not have (bottleneck adapters, prefix and
prompt tuning) are refused with the alternatives.

``fmt="onnx"``: ``model.onnx`` (every method; ``torch.onnx`` with dynamic batch and
length, inputs named as the tokenizer names them, output ``logits``), the tokenizer and
the config. The file is checked with onnxruntime against ``peftbench.load`` on the task's
evaluated split; ``quantize="int8"`` adds ``model.int8.onnx`` (dynamic int8 weights) and
reports its score beside the float model's. The figures go to ``export.json``.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

from peftbench.config import resolve
from peftbench.errors import PeftbenchError
from peftbench.inference import SplitBatches, load, loading, open_checkpoint
from peftbench.methods import get_method, method_names
from peftbench.models import merge_and_unload, without_peft
from peftbench.records import settle_modes, write_atomic

FORMATS = ("hf", "onnx")
ONNX_TOLERANCE = 1e-4  # max |logit difference| between onnxruntime and peftbench.load
EXAMPLE_TEXTS = ["今天天气很好", "这是一个用来导出模型的例子，长一些。"]  # shapes only: batch and length are dynamic
REPORT_FILE = "export.json"


def export(ckpt_dir: str | Path, out_dir: str | Path, fmt: str = "hf", quantize: str | None = None,
           data_dir: str | None = None) -> Path:
    """Write the model of ``ckpt_dir`` to ``out_dir`` (new or empty) in format ``fmt``; returns ``out_dir``.
    ``data_dir`` replaces the task folder recorded in the checkpoint (for the ONNX check)."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise PeftbenchError(f"export format '{fmt}': expected one of {', '.join(FORMATS)}")
    if quantize not in (None, "int8") or (quantize and fmt != "onnx"):
        raise PeftbenchError(f"--quantize {quantize}: only 'int8', with --format onnx")
    with loading(ckpt_dir):
        meta = open_checkpoint(ckpt_dir)
    if fmt == "hf":
        _check_plain(ckpt_dir, meta)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PeftbenchError(f"--out {out_dir}: not empty; export writes a folder of its own")
    stage = out_dir.with_name(f".{out_dir.name}.export")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        if fmt == "hf":
            _write_hf(ckpt_dir, stage)
        else:
            _write_onnx(ckpt_dir, meta, stage, quantize, data_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    settle_modes(stage)
    if out_dir.exists():
        out_dir.rmdir()
    stage.rename(out_dir)
    return out_dir


def _check_plain(ckpt_dir: Path, meta: dict) -> None:
    method = get_method(meta["method"])(resolve(meta["config"]).method)
    if not method.makes_plain_model():
        plain = ", ".join(n for n in method_names() if get_method(n).plain_model)
        raise PeftbenchError(f"method '{meta['method']}' adds modules transformers does not have, so it cannot be a "
                             f"plain Hugging Face model (methods that can: {plain}); export it with --format onnx, "
                             "or load it with peftbench.load")
    quantization = meta["config"]["model"]["quantization"]
    if quantization != "none":
        raise PeftbenchError(f"{ckpt_dir}: trained on a {quantization} base; merged into float weights it would "
                             "not be the model that was trained: load it with peftbench.load")


def _write_hf(ckpt_dir: Path, stage: Path) -> None:
    model, tokenizer, _ = load(ckpt_dir)
    if hasattr(model, "merge_and_unload"):
        model = merge_and_unload(model)
    model.save_pretrained(str(stage))
    tokenizer.save_pretrained(str(stage))


class _Logits(torch.nn.Module):
    """The model as a function of positional input tensors (named ``names``) to logits: what ONNX records."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


def _write_onnx(ckpt_dir: Path, meta: dict, stage: Path, quantize: str | None, data_dir: str | None) -> None:
    try:
        import onnxruntime
    except ImportError:
        raise PeftbenchError("--format onnx needs onnx and onnxruntime: pip install 'peftbench[export]'") from None
    if meta["config"]["model"]["quantization"] != "none":
        raise PeftbenchError(f"{ckpt_dir}: trained on a bitsandbytes-quantised base, which ONNX cannot hold; "
                             "train on a float base, then use --quantize int8")
    model, tokenizer, _ = load(ckpt_dir)
    reference = model
    method = get_method(meta["method"])(resolve(meta["config"]).method)
    if hasattr(model, "merge_and_unload") and method.makes_plain_model():  # LoRA family, AdaLoRA, IA3, tuners
        model = merge_and_unload(copy.deepcopy(reference))  # that merge: one weight per layer (a merged copy)
    example = tokenizer(EXAMPLE_TEXTS, padding=True, return_tensors="pt")
    names = [n for n in tokenizer.model_input_names if n in example]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(_Logits(model, names), tuple(example[n] for n in names), dynamo=True,
                                    input_names=names, output_names=["logits"],
                                    dynamic_shapes=[tuple({0: batch, 1: length} for _ in names)], verbose=False)
    program.save(str(stage / "model.onnx"))
    files = {"model": "model.onnx"}
    if quantize:
        files["model_int8"] = _quantize_int8(stage / "model.onnx", stage / "model.int8.onnx").name
    tokenizer.save_pretrained(str(stage))
    without_peft(model).config.save_pretrained(str(stage))

    batches = SplitBatches(meta, tokenizer, None, data_dir, batch_size=64)
    split = batches.split
    sessions = {key: onnxruntime.InferenceSession(str(stage / name), providers=["CPUExecutionProvider"])
                for key, name in files.items()}
    logits = {key: [] for key in ["peftbench", *sessions]}
    with torch.inference_mode():
        for b in batches:
            logits["peftbench"].append(reference(**b["inputs"]).logits.float())
            for key, session in sessions.items():
                out = session.run(None, {n: b["inputs"][n].numpy() for n in names})[0]
                logits[key].append(torch.from_numpy(out))
    diff = max(float((a - b).abs().max()) for a, b in zip(logits["peftbench"], logits["model"]))
    if not diff <= ONNX_TOLERANCE:
        raise PeftbenchError(f"{ckpt_dir}: the ONNX model's logits differ from peftbench.load's by {diff:.2e} on "
                             f"the {split} split (tolerance {ONNX_TOLERANCE:g}); nothing was written")
    scores = {key: batches.score(per_batch)["score"] for key, per_batch in logits.items()}
    report = {"format": "onnx", "checkpoint": str(ckpt_dir.resolve()), "method": meta["method"],
              "task": meta["task"], "files": files, "inputs": names, "output": "logits",
              "padding": "right (as the saved tokenizer pads)",
              "check": {"split": split, "records": len(batches.encoded), "max_abs_logit_diff": diff,
                        "tolerance": ONNX_TOLERANCE},
              "scores": {"metric": batches.kind.metric, "peftbench": scores["peftbench"], "onnx": scores["model"]},
              "versions": {p: version(p) for p in ("torch", "onnx", "onnxruntime")}}
    if quantize:
        report["scores"].update(onnx_int8=scores["model_int8"],
                                int8_drop=scores["peftbench"] - scores["model_int8"])
    write_atomic(stage / REPORT_FILE, report)


def _quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation (weights int8, activations quantised per batch at run time), after
    onnxruntime's recommended pre-processing (shape inference, graph optimisation)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name("prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # dynamic dims defeat it
    quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    prepared.unlink()
    return target
