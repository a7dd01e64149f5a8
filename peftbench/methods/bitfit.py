"""BitFit (Ben Zaken et al. 2022, arXiv:2106.10199): train only the bias terms.

Every bias of the backbone (attention projections, feed-forward layers, layer
norms) and the classification head are trained; all weights stay frozen.
Trainable parameters: the sum of the backbone's bias sizes, plus the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftbench.methods import InPlaceMethod, MethodConfig, is_head, register_method


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"


@register_method
class BitFit(InPlaceMethod):
    name = "bitfit"
    lr_range = (1e-4, 3e-2)  # a learning-rate search's default (log-spaced) range
    default_lr = 1e-3  # train.lr when unset: BitFit (Ben Zaken et al. 2022 search 1e-4..1e-3)
    Config = BitFitConfig
    plain_model = True

    def is_trainable(self, name: str) -> bool:
        return name.endswith(".bias") or is_head(name)
