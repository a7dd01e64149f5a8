"""BERT-style masking of packed blocks, by token or by whole word."""

from __future__ import annotations

import torch


def mask_tokens(input_ids: torch.Tensor, word_ids: torch.Tensor, probability: float, mask_id: int,
                random_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking over words: each word (``word_ids``; -1 = special, never masked) is chosen with
    ``probability``; a chosen word's tokens become [MASK] (80 %), random tokens drawn from
    ``random_ids`` (10 %), or stay (10 %). Returns (inputs, labels); labels are -100 off the chosen tokens.

    One draw per word, so whole-word and per-token masking share this code. (transformers'
    whole-word masking groups tokens by character offsets, which joins an unspaced Chinese
    sentence into one word, and it drops the random/unchanged 20 %.) Draws come from
    ``generator`` on the CPU, so a run is reproducible and resumable on any device.
    """
    real = word_ids >= 0
    words, inverse = torch.unique(word_ids[real], return_inverse=True)
    chosen_word = torch.rand(len(words), generator=generator) < probability
    action = torch.rand(len(words), generator=generator)  # < .8 mask, < .9 random, else keep
    random_tokens = random_ids[torch.randint(len(random_ids), (int(real.sum()),), generator=generator)]
    device = input_ids.device
    chosen = torch.zeros_like(real)
    chosen[real] = chosen_word.to(device)[inverse]
    act = torch.ones(real.shape, device=device)
    act[real] = action.to(device)[inverse]
    inputs, labels = input_ids.clone(), input_ids.clone()
    labels[~chosen] = -100
    inputs[chosen & (act < 0.8)] = mask_id
    swap = chosen & (act >= 0.8) & (act < 0.9)
    rand_full = input_ids.clone()
    rand_full[real] = random_tokens.to(device)
    inputs[swap] = rand_full[swap]
    return inputs, labels
