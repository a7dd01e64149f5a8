"""peftbench: parameter-efficient fine-tuning on CLUE-style Chinese tasks, measured."""

from peftbench import noise

__version__ = "0.1.0"
noise.install()


def load(ckpt_dir, device="cpu", merge=False, base=None):
    """Load a trained checkpoint: returns (model, tokenizer, meta). See peftbench.inference.load."""
    from peftbench.inference import load as _load

    return _load(ckpt_dir, device, merge, base)
