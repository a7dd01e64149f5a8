"""Masked-LM pretraining: ``peftbench pretrain RECIPE.yaml [key=value ...]``.

Domain-adaptive (continued) pretraining of a hub or local checkpoint, or
pretraining from a config with a character vocabulary built from the corpus.
Text is packed into fixed-length blocks ([CLS] ... [SEP], documents separated
by [SEP]); each micro-batch is masked BERT-style (15 % of the non-special
tokens, or of the words with ``mask.whole_word``; of those 80 % [MASK], 10 % a
random token, 10 % unchanged). The loop is the same Accelerate loop as
fine-tuning, with a step and/or time budget; a checkpoint is written every
``train.save_every`` steps and an interrupted run resumes from it exactly.
The result is a standard Hugging Face model directory (config, safetensors,
tokenizer with ``vocab.txt``) that ``peftbench run model.name_or_path=DIR``
fine-tunes.
"""

from peftbench.pretrain.config import PretrainConfig, load_config
from peftbench.pretrain.corpus import check_not_eval_text, pack, read_documents
from peftbench.pretrain.masking import mask_tokens
from peftbench.pretrain.model import VOCAB_FILE, run_vocab
from peftbench.pretrain.reference import compare_with_reference, describe_reference
from peftbench.pretrain.run import pretrain

__all__ = ["VOCAB_FILE", "PretrainConfig", "check_not_eval_text", "compare_with_reference", "describe_reference",
           "load_config", "mask_tokens", "pack", "pretrain", "read_documents", "run_vocab"]
