"""Backbones and tokenizers: a hub name, a local directory, or the built-in ``tiny``.

``tiny`` is a 2-layer, 128-wide BERT (random init) with a character-level
vocabulary built in memory from the task's training text (saved with the
checkpoint as ``tokenizer.json``), so it runs with no hub. Random init means it measures the
machinery, not a method's accuracy on real language.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
)

from peftbench.errors import PeftbenchError

TINY = "tiny"
TINY_CONFIG = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                   max_position_embeddings=512, type_vocab_size=2, initializer_range=0.1)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_char_vocab(texts, min_freq: int = 1) -> list[str]:
    """Special tokens, then every character seen ``min_freq`` times (most frequent first).

    Characters are lower-cased as the tokenizer does. Non-CJK characters also get a
    ``##`` continuation entry, so a word such as ``iPhone`` splits into characters
    instead of becoming ``[UNK]``.
    """
    counts = Counter(ch for text in texts for ch in text.lower() if not ch.isspace())
    chars = [ch for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_freq]
    continuations = ["##" + ch for ch in chars if not _is_cjk(ch)]
    return SPECIAL_TOKENS + chars + continuations


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F or 0xF900 <= cp <= 0xFAFF


def char_tokenizer(texts, min_freq: int = 1) -> BertTokenizer:
    """A character-level BERT tokenizer for ``texts``, built in memory (``save_pretrained`` writes tokenizer.json)."""
    vocab = build_char_vocab(texts, min_freq)
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


def _check_reachable(name: str, key: str) -> None:
    if Path(name).expanduser().exists():
        return
    if name.startswith(("/", "./", "../", "~")):
        raise PeftbenchError(f"config key '{key}': directory not found: {name}")


def load_tokenizer(model_cfg, train_texts):
    """The tokenizer for a run; ``tiny`` builds a char vocabulary from the training texts."""
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if name == TINY:
        return char_tokenizer(train_texts)
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    _check_reachable(name, key)
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise PeftbenchError(f"config key '{key}': cannot load tokenizer '{name}' "
                             f"(not a local directory, and the hub said: {_first_line(exc)})") from None


def load_model(model_cfg, labels: list[str], tokenizer):
    """A sequence-classification model with ``len(labels)`` outputs."""
    label_kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    extra = {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}
    if model_cfg.name_or_path == TINY:
        config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG, **label_kwargs)
        if extra:
            config._attn_implementation = extra["attn_implementation"]
        return BertForSequenceClassification(config)
    _check_reachable(model_cfg.name_or_path, "model.name_or_path")
    try:
        return AutoModelForSequenceClassification.from_pretrained(model_cfg.name_or_path, **label_kwargs, **extra)
    except OSError as exc:
        raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{model_cfg.name_or_path}' "
                             f"(not a local directory, and the hub said: {_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
