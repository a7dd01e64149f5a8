"""Known third-party messages that tell a peftbench user nothing, silenced one by one (by logger or warning
category, and message), never whole libraries. Installed when ``peftbench`` is imported."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

LOG_MESSAGES = [  # (logger, text in the message): why it says nothing here
    # bitsandbytes, imported by peft, on a CPU with AVX512-BF16: an optional kernel package is not installed
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # Accelerate saving tied weights (BERT's masked-LM decoder is its embedding matrix) once; re-tied on load
    ("accelerate.utils.other", "Removed shared tensor"),
    # prompt tuning feeds embeddings to a decoder: models.guard_padding puts each row's padding in front
    ("transformers.modeling_layers", "will not detect padding tokens in `inputs_embeds`"),
    # the ONNX exporter lists torchvision's detection operators, which no text model uses
    ("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
]
WARNINGS = [  # (category, start of the message)
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),  # peft reads an attribute transformers renamed
    # peft reloading an AdaLoRA adapter: the rank pattern it saved names lora_E tensors, matched against modules
    (RuntimeWarning, "The following rank_pattern keys did not match any targeted module"),
]


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    for logger, text in LOG_MESSAGES:
        logging.getLogger(logger).addFilter(_Drop(text))
    for category, start in WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)


@contextmanager
def quiet_loading():
    """Silence transformers' per-load progress bar and LOAD REPORT: peftbench records what a source lacked."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
