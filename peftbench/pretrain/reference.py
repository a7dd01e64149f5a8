"""Whether a rebuilt backbone is the committed one it rebuilds."""

from __future__ import annotations

from pathlib import Path

from peftbench import checkpoint


def compare_with_reference(model_dir: Path, reference: Path, mlm_loss: float) -> dict:
    """Whether a rebuilt backbone is the reference one: equal fingerprints (config, weights, tokenizer files);
    otherwise how far apart their weights lie (a rebuild on other hardware or library versions rounds
    differently) and their held-out MLM losses."""
    from safetensors.torch import load_file

    ours, theirs = (checkpoint.backbone_fingerprint(str(d), None, random_init=False) for d in (model_dir, reference))
    out = {"folder": str(reference), "fingerprint": theirs, "rebuilt_fingerprint": ours, "matches": ours == theirs,
           "mlm_loss": mlm_loss, "reference_mlm_loss": (checkpoint.pretrained_by_peftbench(str(reference)) or {}).get(
               "mlm_loss")}
    if not out["matches"]:
        weights = [{k: v for d in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(d)).items()}
                   for folder in (model_dir, reference)]
        same_shapes = weights[0].keys() == weights[1].keys() and all(
            weights[0][k].shape == weights[1][k].shape for k in weights[0])
        out["max_abs_weight_diff"] = max((float((weights[0][k].float() - weights[1][k].float()).abs().max())
                                          for k in weights[0]), default=0.0) if same_shapes else None
    return out


def describe_reference(ref: dict) -> str:
    """One line: the rebuild matches the reference, or how it differs."""
    if ref["matches"]:
        return f"rebuild matches {ref['folder']} (fingerprint {ref['fingerprint'][:12]})"
    diff = ("other tensor names or shapes" if ref["max_abs_weight_diff"] is None
            else f"max |weight difference| {ref['max_abs_weight_diff']:.2e}")
    loss = "" if ref["reference_mlm_loss"] is None else \
        f"; held-out MLM loss {ref['mlm_loss']:.4f} (reference {ref['reference_mlm_loss']:.4f})"
    return (f"rebuild differs from {ref['folder']}: fingerprint {ref['rebuilt_fingerprint'][:12]}, "
            f"reference {ref['fingerprint'][:12]}; {diff}{loss}")
