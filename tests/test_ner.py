"""Token classification: spans <-> tags, alignment, entity metrics, loaders, every method on NER."""

import json
import logging
import unicodedata
from types import SimpleNamespace

import pytest
from conftest import (
    NER_ARGS,
    NER_SETTINGS,
    SHARED_CLUE,
    logits_in_new_process,
    needs_shared_clue,
    torchrun,
    write_jsonl,
)

from peftbench import config
from peftbench.errors import PeftbenchError
from peftbench.inference import predict
from peftbench.metrics import entity_metrics
from peftbench.models import char_tokenizer
from peftbench.tasks import load_task
from peftbench.tasks.kinds import TOKEN_CLASSIFICATION
from peftbench.tasks.ner import Span, predicted_spans, spans_to_tags, tag_names, tags_to_spans
from peftbench.train import run

TRICKY = [  # (text, spans): adjacent, repeated text, at start and end, single characters
    ("张伟李娜在北京", [Span(0, 1, "name"), Span(2, 3, "name"), Span(5, 6, "address")]),
    ("华为华为", [Span(0, 1, "company"), Span(2, 3, "company")]),
    ("京", [Span(0, 0, "address")]),
    ("去了上海", [Span(2, 3, "address")]),
    ("李上海王", [Span(0, 0, "name"), Span(1, 2, "address"), Span(3, 3, "name")]),
    ("没有实体", []),
]


@pytest.mark.parametrize("scheme", ["bio", "bioes"])
@pytest.mark.parametrize("text,spans", TRICKY)
def test_spans_tags_round_trip(scheme, text, spans):
    tags = spans_to_tags(len(text), spans, scheme)
    assert set(tags) <= set(tag_names(("name", "address", "company"), scheme))
    assert tags_to_spans(tags) == spans


def test_bioes_tags_and_lenient_reading():
    assert spans_to_tags(5, [Span(0, 2, "a"), Span(4, 4, "b")], "bioes") == ["B-a", "I-a", "E-a", "O", "S-b"]
    # Read as conlleval: a stray I- starts an entity, a type change splits one.
    assert tags_to_spans(["O", "I-a", "I-a", "O"]) == [Span(1, 2, "a")]
    assert tags_to_spans(["B-a", "I-b", "O"]) == [Span(0, 0, "a"), Span(1, 1, "b")]
    assert tags_to_spans(["B-a", "E-a", "E-a"]) == [Span(0, 1, "a"), Span(2, 2, "a")]


def alignment_round_trip(tokenizer, text, spans, scheme="bio", max_length=64):
    """Encode gold spans, use the gold labels as predictions, decode: the spans that come back."""
    from datasets import Dataset

    ds = Dataset.from_dict({"text_a": [text], "text_b": [""], "label": [0], "id": [1],
                            "entities": [[{"start": s.start, "end": s.end, "type": s.type} for s in spans]]})
    tags = tag_names(("name", "address", "company"), scheme)
    spec = SimpleNamespace(labels=tags, tag_scheme=scheme)
    enc = TOKEN_CLASSIFICATION.encode(ds, tokenizer, spec, max_length, pair=False)[0]
    pred = [max(label, 0) for label in enc["labels"]]
    return enc, predicted_spans(pred, enc["char_index"], len(text), tags)


@pytest.mark.parametrize("scheme", ["bio", "bioes"])
def test_alignment_round_trip_on_awkward_characters(scheme):
    tok = char_tokenizer(["张伟在北京，华为（中国）公司 New York"])
    cases = [
        ("张伟在北京，华为（中国）", [Span(0, 1, "name"), Span(3, 4, "address"), Span(6, 7, "company")]),
        ("鑫鑫在北京", [Span(0, 1, "name")]),  # characters not in the vocabulary: [UNK]
        ("（中国）公司", [Span(1, 2, "address")]),  # full-width punctuation around an entity
        ("在 New York 工作", [Span(2, 9, "address")]),  # letters one per token; a space inside the entity
        ("New York", [Span(0, 7, "address")]),  # at the start and the end
    ]
    for text, spans in cases:
        _, back = alignment_round_trip(tok, text, spans, scheme)
        assert back == spans, text


def test_first_piece_rule_for_a_character_of_several_tokens():
    # A Hangul syllable is normalised (NFD) into jamo: one character, three tokens.
    tok = char_tokenizer(["我在한국", unicodedata.normalize("NFD", "한국")])
    enc, back = alignment_round_trip(tok, "我在한국", [Span(2, 3, "address")])
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert len(tokens) > 6, tokens  # [CLS] 我 在 + several pieces per syllable + [SEP]
    first = [i for i, c in enumerate(enc["char_index"]) if c >= 0]
    assert [enc["char_index"][i] for i in first] == [0, 1, 2, 3]
    later = [i for i, c in enumerate(enc["char_index"]) if c < 0]
    assert all(enc["labels"][i] == -100 for i in later), "later pieces and specials carry no label"
    assert back == [Span(2, 3, "address")]


def test_truncation_loses_entities_past_the_limit():
    tok = char_tokenizer(["张伟" + "的" * 20 + "北京"])
    text = "张伟" + "的" * 20 + "北京"
    _, back = alignment_round_trip(tok, text, [Span(0, 1, "name"), Span(22, 23, "address")], max_length=12)
    assert back == [Span(0, 1, "name")]


def test_entity_metrics_on_hand_made_predictions():
    gold = [[Span(0, 1, "a"), Span(3, 4, "b")], [Span(2, 2, "a")]]
    pred = [[Span(0, 1, "a"), Span(3, 4, "a")], [Span(2, 2, "a"), Span(5, 6, "b")]]
    m = entity_metrics(gold, pred, ("a", "b"))
    # 2 of 4 predicted entities are right, 2 of 3 gold entities are found.
    assert m["entity_precision"] == pytest.approx(0.5)
    assert m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["per_type_f1"]["a"] == pytest.approx(0.8) and m["per_type_f1"]["b"] == 0.0
    assert entity_metrics([[]], [[]], ("a",))["entity_f1"] == 0.0


def test_entity_metrics_agree_with_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    gold_tags = [["B-a", "I-a", "O", "B-b", "I-b", "O", "O"], ["O", "O", "B-a", "O", "O", "O", "O"]]
    pred_tags = [["B-a", "I-a", "O", "B-a", "I-a", "O", "O"], ["O", "O", "B-a", "O", "O", "B-b", "I-b"]]
    m = entity_metrics([tags_to_spans(t) for t in gold_tags], [tags_to_spans(t) for t in pred_tags], ("a", "b"))
    assert m["entity_f1"] == pytest.approx(seqeval.f1_score(gold_tags, pred_tags))
    assert m["entity_precision"] == pytest.approx(seqeval.precision_score(gold_tags, pred_tags))


def cluener_dir(root, train, dev, test=None):
    write_jsonl(root / "train.json", train)
    write_jsonl(root / "dev.json", dev)
    if test is not None:
        write_jsonl(root / "test.json", test)
    return root


def load_cluener(data_dir, **task):
    return load_task(config.load(None, ["task.name=cluener", f"task.data_dir={data_dir}"]
                                 + [f"task.{k}={json.dumps(v)}" for k, v in task.items()]).task)


def test_cluener_loader(tmp_path):
    train = [{"text": "张伟在北京", "label": {"name": {"张伟": [[0, 1]]}, "address": {"北京": [[3, 4]]}}},
             {"text": "没有实体"},  # no entities: no label field
             {"text": "北京北京", "label": {"address": {"北京": [[0, 1], [2, 3]]}}}]
    data = load_cluener(cluener_dir(tmp_path, train, train[:1], [{"id": 7, "text": "在上海"}]))
    ents = data.splits["train"]["entities"]
    assert ents[0] == [{"start": 0, "end": 1, "type": "name"}, {"start": 3, "end": 4, "type": "address"}]
    assert ents[1] == [] and len(ents[2]) == 2
    assert data.labeled("train") and not data.labeled("test")
    assert data.splits["test"]["id"] == [7]
    assert data.spec.labels[:3] == ("O", "B-address", "I-address") and len(data.spec.labels) == 21


@pytest.mark.parametrize("label,message", [
    ({"name": {"张伟": [[0, 9]]}}, r"train\.json:1: field 'label\.name': entity '张伟' at \[0, 9\] is outside"),
    ({"name": {"张伟": [[1, 2]]}}, r"train\.json:1: field 'label\.name': entity '张伟' at \[1, 2\] does not match"),
    ({"person": {"张伟": [[0, 1]]}}, r"train\.json:1: field 'label': entity type 'person'"),
    ({"name": {"张伟": [0, 1]}}, r"train\.json:1: field 'label\.name': entity '张伟': offsets 0 are not"),
])
def test_bad_spans_name_file_line_and_entity(tmp_path, label, message):
    cluener_dir(tmp_path, [{"text": "张伟在北京", "label": label}], [{"text": "北京"}])
    with pytest.raises(PeftbenchError, match=message):
        load_cluener(tmp_path)


def test_overlapping_entities_are_resolved_reported_and_counted(tmp_path, caplog):
    train = [{"text": "北京大学在北京",
              "label": {"organization": {"北京大学": [[0, 3]]}, "address": {"北京": [[0, 1], [5, 6]]}}}]
    with caplog.at_level(logging.WARNING, logger="peftbench"):
        data = load_cluener(cluener_dir(tmp_path, train, train))
    assert data.overlapping_entities == {"train": 1, "dev": 1}
    assert data.splits["train"]["entities"][0] == [{"start": 0, "end": 3, "type": "organization"},
                                                  {"start": 5, "end": 6, "type": "address"}]
    assert "train.json:1: field 'label': entity '北京' [0, 1] (address) overlaps '北京大学'" in caplog.text


def test_custom_ner_conll_format(tmp_path):
    (tmp_path / "train.txt").write_text("张 B-name\n伟 I-name\n在 O\n北 B-loc\n京 I-loc\n\n好 O\n\u3000 O\n  O\n",
                                        encoding="utf-8")  # a full-width and a plain space as tagged tokens
    (tmp_path / "dev.txt").write_text("李 S-name\n\nNew B-loc\nYork E-loc\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("张\n伟\n", encoding="utf-8")
    cfg = config.load(None, ["task.name=custom_ner", f"task.data_dir={tmp_path}", "task.labels=[name, loc]"])
    data = load_task(cfg.task)
    assert data.splits["train"]["text_a"] == ["张伟在北京", "好\u3000 "]
    assert data.splits["train"]["entities"][0] == [{"start": 0, "end": 1, "type": "name"},
                                                   {"start": 3, "end": 4, "type": "loc"}]
    assert data.splits["train"]["id"] == [1, 7]  # the line each sentence starts on
    assert data.splits["dev"]["text_a"] == ["李", "NewYork"]
    assert data.splits["dev"]["entities"][1] == [{"start": 0, "end": 6, "type": "loc"}]
    assert not data.labeled("test")
    (tmp_path / "train.txt").write_text("张 B-name\n伟 X-name\n", encoding="utf-8")
    with pytest.raises(PeftbenchError, match=r"train\.txt:2: tag 'X-name'"):
        load_task(cfg.task)


def test_custom_ner_span_format_and_config_errors(tmp_path):
    recs = [{"sentence": "张伟", "ents": {"per": {"张伟": [[0, 1]]}}}]
    write_jsonl(tmp_path / "train.json", recs)
    write_jsonl(tmp_path / "dev.json", recs)
    data = load_task(config.load(None, ["task.name=custom_ner", f"task.data_dir={tmp_path}", "task.labels=[per]",
                                        "task.text_fields=[sentence]", "task.label_field=ents"]).task)
    assert data.splits["train"]["entities"][0] == [{"start": 0, "end": 1, "type": "per"}]
    with pytest.raises(PeftbenchError, match="entity types"):
        load_task(config.load(None, ["task.name=custom_ner", f"task.data_dir={tmp_path}"]).task)
    with pytest.raises(PeftbenchError, match="task.tag_scheme"):
        load_task(config.load(None, ["task.name=synthetic", "task.tag_scheme=bioes"]).task)
    with pytest.raises(PeftbenchError, match="task.tag_scheme"):
        load_task(config.load(None, ["task.name=synthetic_ner", "task.tag_scheme=bilou"]).task)


# Per-method settings for the random-init tiny backbone. Its frozen random layers give PEFT methods
# little to work with on NER: some need up to 10 epochs, and adapters a wider bottleneck than d/16 = 8.
@pytest.mark.parametrize("method", list(NER_SETTINGS))
def test_every_method_learns_ner(ner_runs, method):
    m = ner_runs[method].record["metrics"]
    assert m["score_name"] == "entity_f1" and m["score"] == m["entity_f1"]
    assert m["test_entity_f1"] > 0.2, m  # predicting no entity scores 0
    assert set(m["per_type_f1"]) == {"name", "address", "company"}
    assert m["n_eval"] == 200 and m["n_gold_entities"] > 200
    assert ner_runs[method].record["baselines"]["test"] == {"chance": None, "majority": 0.0}  # all O: no entity
    for split, f1 in (("dev", m["entity_f1"]), ("test", m["test_entity_f1"])):  # what the bootstrap resamples
        part = ner_runs[method].record["per_example"][split]
        hits, pred_only, gold_only = (sum(v[k] for v in part["values"]) for k in range(3))
        assert part["n"] == 200 and part["metric"] == "entity_f1" and hits + gold_only == m[
            "n_gold_entities" if split == "dev" else "test_n_gold_entities"]
        assert 2 * hits / (2 * hits + pred_only + gold_only) == pytest.approx(f1, abs=1e-9)


def test_ner_checkpoint_reloads_and_predicts_clue_format(ner_runs, tmp_path):
    import torch

    texts = ["张伟在北京市的华为工作", "李娜去了上海"]
    ckpts = {m: ner_runs[m].record["checkpoint"] for m in ("lora", "prompt", "adapter", "full")}
    reloaded = logits_in_new_process(ckpts, texts, tmp_path)
    for method in ckpts:
        result = ner_runs[method]
        with torch.no_grad():
            here = result.model.eval()(**result.tokenizer(texts, padding=True, return_tensors="pt")).logits
        assert torch.allclose(here, reloaded[method], atol=1e-5), method
    from peftbench import load

    model, tokenizer, _ = load(ckpts["prompt"])  # given labels, a loaded prompt lines them up as training did
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.where(enc["attention_mask"] == 1, 0, -100)
    with torch.no_grad():
        trained = ner_runs["prompt"].model(**enc, labels=labels).loss
        torch.testing.assert_close(model(**enc, labels=labels).loss, trained)

    out = predict(ckpts["lora"], "test", None, f"{tmp_path}/sub/", fmt="clue")
    assert out.name == "synthetic_ner_predict.json"
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200 and all(set(r) == {"id", "label"} for r in rows)
    from peftbench.tasks.synthetic import generate_ner_splits

    test = generate_ner_splits()["test"]
    gold = [[Span(s, e, t) for t, ents in r.get("label", {}).items() for spans in ents.values() for s, e in spans]
            for r in test]
    pred = [[Span(s, e, t) for t, ents in r["label"].items() for spans in ents.values() for s, e in spans]
            for r in rows]
    assert [r["id"] for r in rows] == [r["id"] for r in test]
    for r, t in zip(rows, test):
        for ents in r["label"].values():
            for entity, spans in ents.items():
                assert all(t["text"][s : e + 1] == entity for s, e in spans)
    f1 = entity_metrics(gold, pred, ("name", "address", "company"))["entity_f1"]
    assert f1 == pytest.approx(ner_runs["lora"].record["metrics"]["test_entity_f1"])


def test_two_processes_score_every_entity_once(ner_runs, tmp_path):
    proc = torchrun(2, "run", *NER_ARGS, "method.name=lora", *NER_SETTINGS["lora"], "train.batch_size=8",
                    "train.save_checkpoint=false", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "record.json").read_text())["metrics"]
    one = ner_runs["lora"].record["metrics"]  # the same global batch of 16 in one process
    assert two["n_eval"] == one["n_eval"] == 200
    assert two["n_gold_entities"] == one["n_gold_entities"]
    assert two["test_n_gold_entities"] == one["test_n_gold_entities"]
    assert abs(two["entity_f1"] - one["entity_f1"]) < 0.15


@pytest.mark.slow
@needs_shared_clue
def test_real_cluener_run(tmp_path):
    cfg = config.load(None, ["task.name=cluener", f"task.data_dir={SHARED_CLUE / 'cluener'}", "method.name=lora",
                             "task.max_train_samples=1500", "task.max_length=64", "train.epochs=2", "train.lr=1e-2",
                             f"output_dir={tmp_path}"])
    rec = run(cfg).record
    assert rec["data"]["n_dev"] == 1343 and rec["metrics"]["n_eval"] == 1343
    assert rec["metrics"]["n_gold_entities"] == 3072
    assert "test_score" not in rec["metrics"]  # test.json is unlabeled
    assert rec["metrics"]["token_accuracy"] > 0.5


def test_the_ner_model_card_holds_entity_scores_as_a_model_index(ner_runs):
    from pathlib import Path

    from huggingface_hub import ModelCard

    record = ner_runs["lora"].record
    data = ModelCard.load(Path(record["checkpoint"]) / "README.md").data
    m = record["metrics"]
    assert {(e.dataset_split, e.metric_type, e.metric_config): e.metric_value for e in data.eval_results} == {
        (split, kind, "micro"): m[f"{prefix}entity_{name}"] for split, prefix in (("validation", ""), ("test", "test_"))
        for kind, name in (("f1", "f1"), ("precision", "precision"), ("recall", "recall"))}
    assert {e.task_type for e in data.eval_results} == {"token-classification"}


def test_the_cluener_evaluate_module_scores_predictions_as_the_run_did(ner_runs, tmp_path):
    """``peftbench predict``'s entities (their spans) through the cluener_f1 module: the record's test scores."""
    evaluate = pytest.importorskip("evaluate")
    from peftbench.evaluate_modules import module_path
    from peftbench.tasks.synthetic import generate_ner_splits

    record = ner_runs["lora"].record
    out = predict(record["checkpoint"], "test", None, tmp_path / "test.jsonl")
    predicted = [[{k: e[k] for k in ("start", "end", "type")} for e in json.loads(line)["entities"]]
                 for line in out.read_text(encoding="utf-8").splitlines()]
    gold = [[{"start": s, "end": e, "type": t} for t, ents in r.get("label", {}).items() for spans in ents.values()
             for s, e in spans] for r in generate_ner_splits()["test"]]
    metric, m = evaluate.load(module_path("cluener_f1")), record["metrics"]
    scores = metric.compute(predictions=predicted, references=gold, entity_types=["name", "address", "company"])
    assert {k: scores[k] for k in ("entity_f1", "entity_precision", "entity_recall", "per_type_f1")} == {
        k: m[f"test_{k}"] for k in ("entity_f1", "entity_precision", "entity_recall", "per_type_f1")}
    assert scores["n_eval"] == 200 and scores["n_gold_entities"] == m["test_n_gold_entities"]
    alone = metric.compute(predictions=[[{"start": 0, "end": 1, "type": "name"}]], references=[[]])
    assert alone["per_type_f1"] == {"name": 0.0} and alone["entity_precision"] == 0.0  # types seen, by default
