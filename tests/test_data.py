import torch

from peftbench.data import Collator, LengthGroupedBatchSampler


def test_length_grouped_sampler_covers_every_index_once_and_is_deterministic():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=32, seed=3)
    epoch0 = list(sampler)
    assert len(epoch0) == len(sampler) == 32
    assert sorted(i for b in epoch0 for i in b) == list(range(1000))
    assert list(LengthGroupedBatchSampler(lengths, 32, seed=3)) == epoch0
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0


def test_length_grouping_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(2000)]

    def padded(group):
        batches = LengthGroupedBatchSampler(lengths, 32, seed=0, group_by_length=group)
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(True) < 0.7 * padded(False)


def test_collator_pads_and_counts_real_tokens():
    examples = [{"input_ids": [2, 5, 3], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1], "labels": 1,
                 "id": 10},
                {"input_ids": [2, 3], "token_type_ids": [0, 0], "attention_mask": [1, 1], "labels": 0, "id": 11}]
    batch = Collator(pad_id=0, pad_to_multiple_of=4)(examples)
    assert batch["inputs"]["input_ids"].tolist() == [[2, 5, 3, 0], [2, 3, 0, 0]]
    assert batch["inputs"]["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["num_tokens"] == 5
    assert torch.equal(batch["labels"], torch.tensor([1, 0])) and batch["id"].tolist() == [10, 11]


def test_char_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from peftbench.models import SPECIAL_TOKENS, build_char_vocab, char_tokenizer

    texts = ["新款iPhone发布，价格5999元！", "ａｂ全角字符"]
    vocab = build_char_vocab(texts)
    assert vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and len(vocab) == len(set(vocab))
    tok = char_tokenizer(texts)
    pieces = tok.convert_ids_to_tokens(tok("新款iPhone发布")["input_ids"])
    assert pieces == ["[CLS]", "新", "款", "i", "##p", "##h", "##o", "##n", "##e", "发", "布", "[SEP]"]
    assert "[UNK]" not in tok.convert_ids_to_tokens(tok(texts[0])["input_ids"])
    tok.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded(texts)["input_ids"] == tok(texts)["input_ids"]
