"""First-class names for PEFT tuners: ``method.name=vera`` is the bridge (``peft_tuner.py``) with the type
fixed, its own default options and learning rates, and a page (docs/methods/<name>.md).

``trained(dims, options)`` is each tuner's parameter-count formula (the head aside) over the
``(d_in, d_out)`` of the modules it adapts; the tests check it against the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Callable

from peftbench.config import require
from peftbench.methods import register_method
from peftbench.methods.peft_tuner import PeftTuner, PeftTunerConfig

Dims = list[tuple[int, int]]


def _lokr(dims: Dims, o: dict) -> int:
    from peft.tuners.lokr.layer import factorization

    total = 0
    for d_in, d_out in dims:
        (in_a, in_b), (out_a, out_b) = factorization(d_in, -1), factorization(d_out, -1)
        w2_full = o["r"] >= max(out_b, in_b) / 2  # PEFT keeps the second factor whole when r is that large
        total += out_a * in_a + (out_b * in_b if w2_full else o["r"] * (out_b + in_b))
    return total


@dataclass(frozen=True)
class Named:
    peft_type: str
    doc: str  # one line: the method and its paper
    lr_range: tuple[float, float]  # a learning-rate search's default (log-spaced) range
    default_lr: float  # train.lr when unset
    trained: Callable[[Dims, dict], int]  # trained parameters over the adapted modules (head aside)
    options: dict = field(default_factory=dict)  # defaults under method.options, where PEFT has none or differs
    formula_options: dict = field(default_factory=dict)  # PEFT 0.21's defaults that the formula reads


NAMED: dict[str, Named] = {
    "vera": Named("VERA", "VeRA (Kopiczko et al. 2024, arXiv:2310.11454): frozen shared random A, B; trained "
                  "scaling vectors", (1e-3, 1e-1), 1e-2, lambda dims, o: sum(d_out + o["r"] for _, d_out in dims),
                  formula_options={"r": 256}),
    "loha": Named("LOHA", "LoHa (Hyeon-Woo et al. 2022, arXiv:2108.06098): a Hadamard product of two low-rank "
                  "updates", (1e-4, 3e-2), 1e-3, lambda dims, o: sum(2 * o["r"] * (i + j) for i, j in dims),
                  formula_options={"r": 8}),
    "lokr": Named("LOKR", "LoKr (Yeh et al. 2024, arXiv:2309.14859): a Kronecker product of two small factors",
                  (1e-4, 3e-2), 1e-3, _lokr, formula_options={"r": 8}),
    "oft": Named("OFT", "OFT (Qiu et al. 2023, arXiv:2306.07280): a block-diagonal orthogonal rotation of W's "
                 "inputs", (1e-4, 3e-2), 1e-3, lambda dims, o: sum(i // o["oft_block_size"] * o["oft_block_size"] *
                                                                  (o["oft_block_size"] - 1) // 2 for i, _ in dims),
                 formula_options={"oft_block_size": 32}),
    "boft": Named("BOFT", "BOFT (Liu et al. 2024, arXiv:2311.06243): an orthogonal rotation as a product of "
                  "butterfly factors", (1e-4, 3e-2), 1e-3,
                  lambda dims, o: sum(o["boft_n_butterfly_factor"] * i // o["boft_block_size"] *
                                      o["boft_block_size"] ** 2 + j for i, j in dims),
                  formula_options={"boft_block_size": 4, "boft_n_butterfly_factor": 1}),
    "hra": Named("HRA", "HRA (Yuan et al. 2024, arXiv:2405.17484): a chain of r Householder reflections of W's "
                 "inputs", (1e-4, 3e-2), 1e-3, lambda dims, o: sum(o["r"] * i for i, _ in dims),
                 formula_options={"r": 8}),
    "fourierft": Named("FOURIERFT", "FourierFT (Gao et al. 2024, arXiv:2405.03003): n trained spectral "
                       "coefficients of ΔW per layer", (1e-3, 3e-1), 3e-2,
                       lambda dims, o: o["n_frequency"] * len(dims), formula_options={"n_frequency": 1000}),
    "lntuning": Named("LN_TUNING", "LN tuning (Zhao et al. 2024, arXiv:2312.11420): train the layer norms' gain "
                      "and bias", (1e-4, 3e-2), 1e-3, lambda dims, o: sum(2 * d for d, _ in dims)),
    "ptuning": Named("P_TUNING", "P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual tokens from a trained "
                     "prompt encoder (an MLP)", (1e-3, 3e-1), 1e-2,
                     lambda dims, o: _ptuning(dims[0][0], o["num_virtual_tokens"]),
                     options={"num_virtual_tokens": 20}),
}


def _ptuning(d: int, n: int) -> int:
    """n embeddings of width d, then PEFT's MLP encoder d -> d -> d -> d (hidden width d by default)."""
    return n * d + 3 * (d * d + d)


def _register(name: str, named: Named) -> None:
    def check_type(cfg):
        PeftTunerConfig.__post_init__(cfg)
        require(cfg.peft_type == named.peft_type, "method.peft_type", f"{named.peft_type} for method.name={name} "
                "(method.name=peft takes any type)", cfg.peft_type)

    config = make_dataclass(f"{name.title()}Config", [("name", str, field(default=name)),
                                                     ("peft_type", str, field(default=named.peft_type))],
                            bases=(PeftTunerConfig,), namespace={"__post_init__": check_type})
    register_method(type(f"{name.title()}Tuner", (PeftTuner,), {
        "__doc__": named.doc, "__module__": __name__, "name": name, "preset_of": "peft", "Config": config,
        "lr_range": named.lr_range, "default_lr": named.default_lr, "preset_options": named.options}))


for _name, _named in NAMED.items():
    _register(_name, _named)
