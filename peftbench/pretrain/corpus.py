"""The corpus: documents read from text or JSON-lines files, packed into fixed-length blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from peftbench.errors import PeftbenchError, where
from peftbench.tasks import is_evaluation_file, read_records


def check_not_eval_text(path: Path, allow: bool) -> None:
    """Refuse a dev/test file of a task layout: pretraining on it leaks evaluation text into every score."""
    if is_evaluation_file(path) and not allow:
        raise PeftbenchError(f"{path}: named like a task's dev/test file; pretraining on evaluation text leaks it "
                             "into every fine-tuned score (set corpus.allow_eval_text=true to use it anyway)")


def read_documents(paths: list[str], text_fields: list[str], allow_eval_text: bool = False) -> list[str]:
    """Every non-empty document of the corpus files, in order."""
    docs = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise PeftbenchError(f"config key 'corpus.files': file not found: {path}")
        check_not_eval_text(path, allow_eval_text)
        if path.suffix in (".json", ".jsonl"):
            for lineno, record in read_records(path):
                texts = [record[f] for f in text_fields if isinstance(record.get(f), str)]
                if not any(f in record for f in text_fields):
                    raise PeftbenchError(f"{where(path, lineno, '/'.join(text_fields))}: no text field "
                                         f"(record keys: {', '.join(record)}; set corpus.text_fields)")
                docs.extend(t.strip() for t in texts if t.strip())
        else:
            with path.open(encoding="utf-8", newline="\n") as fh:
                docs.extend(line.strip() for line in fh if line.strip())
    if not docs:
        raise PeftbenchError(f"config key 'corpus.files': no text in {', '.join(paths)}")
    return docs


def _word_starts(text: str) -> list[int]:
    """Character offsets where a word starts (jieba segmentation)."""
    import jieba

    starts, pos = [], 0
    for word in jieba.lcut(text):
        starts.append(pos)
        pos += len(word)
    return starts


def pack(docs: list[str], tokenizer, block_size: int, whole_word: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents (separated by [SEP]) into blocks ``[CLS] ... [SEP]`` of ``block_size`` tokens.

    Returns (input_ids, word_ids), both ``[n_blocks, block_size]``; ``word_ids`` numbers the
    words (one per token unless ``whole_word``) and is -1 on special tokens. The tail that does
    not fill a block is dropped.
    """
    if whole_word:
        try:
            import jieba

            jieba.setLogLevel(60)
        except ImportError:
            raise PeftbenchError("config key 'mask.whole_word': needs jieba (pip install jieba)") from None
    sep, body = tokenizer.sep_token_id, block_size - 2
    ids, words, word = [], [], 0
    for start in range(0, len(docs), 1000):
        chunk = docs[start : start + 1000]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=whole_word)
        for i, doc_ids in enumerate(enc["input_ids"]):
            if whole_word:
                starts = set(_word_starts(chunk[i]))
                for j, (s, _) in enumerate(enc["offset_mapping"][i]):
                    word += j == 0 or s in starts
                    words.append(word)
            else:
                words.extend(range(word + 1, word + 1 + len(doc_ids)))
                word += len(doc_ids)
            ids.extend(doc_ids)
            ids.append(sep)
            words.append(-1)
            word += 1
    n_blocks = len(ids) // body
    if n_blocks == 0:
        raise PeftbenchError(f"the corpus holds {len(ids)} tokens, fewer than one block of {block_size}")
    ids = torch.tensor(ids[: n_blocks * body]).view(n_blocks, body)
    words = torch.tensor(words[: n_blocks * body]).view(n_blocks, body)
    column = torch.full((n_blocks, 1), -1)
    input_ids = torch.cat([torch.full((n_blocks, 1), tokenizer.cls_token_id), ids, torch.full((n_blocks, 1), sep)], 1)
    return input_ids, torch.cat([column, words, column], 1)
