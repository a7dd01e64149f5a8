import json

import pytest
from conftest import SHARED_CLUE, fewclue_dir, needs_shared_clue, write_jsonl

from peftbench.config import TaskConfig
from peftbench.errors import PeftbenchError
from peftbench.tasks import get_spec, load_task, task_names
from peftbench.tasks.clue import TNEWS_CODES, mark_wsc_spans
from peftbench.tasks.synthetic import SPLIT_SIZES, generate_splits, write_files


def load(name, data_dir, **kw):
    return load_task(TaskConfig(name=name, data_dir=str(data_dir), **kw))


def test_registered_tasks():
    expected = {"tnews", "iflytek", "afqmc", "ocnli", "cmnli", "csl", "cluewsc2020", "eprstmt", "bustm", "csldcp",
                "custom", "synthetic"}
    assert expected <= set(task_names())


@pytest.mark.parametrize("layout", ["fewclue", "clue"])
def test_synthetic_files_load_in_both_layouts(tmp_path, layout):
    data = load("synthetic", write_files(tmp_path, layout))
    assert {k: len(v) for k, v in data.splits.items()} == SPLIT_SIZES
    assert data.labeled("dev")
    assert data.labeled("test") == (layout == "fewclue")  # a CLUE release's test.json has no labels
    generated = load_task(TaskConfig(name="synthetic"))
    assert generated.splits["train"]["text_a"][:5] == data.splits["train"]["text_a"][:5]


def test_synthetic_generator_is_deterministic_and_splits_disjoint():
    a, b = generate_splits(0), generate_splits(0)
    assert a == b and generate_splits(1) != a
    texts = {s: {r["sentence"] for r in recs} for s, recs in a.items()}
    assert len(texts["train"] & texts["dev"]) < 3


def test_tnews_int_and_string_labels_map_to_same_indices(tmp_path):
    as_int = [{"label": 100, "label_desc": "news_story", "sentence": "甲", "id": 1},
              {"label": 116, "label_desc": "news_game", "sentence": "乙", "id": 2}]
    as_str = [{"label": "100", "label_desc": "news_story", "sentence": "甲"},
              {"label": "116", "label_desc": "news_game", "sentence": "乙"}]
    a = load("tnews", fewclue_dir(tmp_path / "a", as_int, as_int))
    b = load("tnews", fewclue_dir(tmp_path / "b", as_str, as_str))
    assert list(a.splits["train"]["label"]) == list(b.splits["train"]["label"]) == [0, 14]
    assert len(TNEWS_CODES) == 15 and "105" not in TNEWS_CODES and "111" not in TNEWS_CODES
    assert list(a.splits["train"]["id"]) == [1, 2]


def test_label_outside_label_set_names_file_line_field(tmp_path):
    dev = [{"label": 100, "sentence": "甲"}, {"label": 105, "sentence": "乙"}]
    d = fewclue_dir(tmp_path, [{"label": 100, "sentence": "甲"}], dev)
    message = r"dev_few_all\.json:2: field 'label': label '105' is not a label of task 'tnews'"
    with pytest.raises(PeftbenchError, match=message):
        load("tnews", d)


def test_iflytek_u2028_inside_text_and_crlf_lines(tmp_path):
    text = "第一行\u2028第二行\r内部"
    records = [{"label": 3, "label_des": "租车", "sentence": text, "id": 7},
               {"label": 118, "label_des": "其他", "sentence": "x", "id": 8}]
    data = load("iflytek", fewclue_dir(tmp_path, records, records, newline="\r\n"))
    assert len(data.splits["train"]) == 2
    assert data.splits["train"]["text_a"][0] == text
    assert list(data.splits["dev"]["label"]) == [3, 118]


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    """Windows tools write a BOM at the start of a UTF-8 file; JSON lines and CSV both read past it."""
    line = '{"sentence": "很好", "label": "Positive"}\n'
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "train_few_all.json").write_bytes(b"\xef\xbb\xbf" + (line * 2).encode())
    (tmp_path / "j" / "dev_few_all.json").write_text(line, encoding="utf-8")
    assert load("eprstmt", tmp_path / "j").splits["train"]["text_a"] == ["很好", "很好"]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_bytes(b"\xef\xbb\xbftext,label\n\xe5\xa5\xbd,1\n")
    (tmp_path / "c" / "dev.csv").write_text("text,label\nx,0\n", encoding="utf-8")
    data = load("custom", tmp_path / "c", text_fields=["text"], labels=["0", "1"])
    assert data.splits["train"]["text_a"] == ["好"] and data.splits["train"]["label"] == [1]


def test_ocnli_dash_labels_dropped_and_counted(tmp_path):
    recs = [{"sentence1": "a", "sentence2": "b", "label": lab}
            for lab in ("entailment", "-", "neutral", "-", "contradiction")]
    data = load("ocnli", fewclue_dir(tmp_path, recs, recs[:3]))
    assert len(data.splits["train"]) == 3 and data.dropped == {"train": 2, "dev": 1}
    assert list(data.splits["train"]["label"]) == [0, 1, 2]
    assert data.splits["train"]["text_b"][0] == "b"


def test_csl_keywords_list_and_abstract(tmp_path):
    recs = [{"id": 0, "abst": "摘要文本", "keyword": ["甲", "乙"], "label": "1"}]
    data = load("csl", fewclue_dir(tmp_path, recs, recs))
    row = data.splits["train"][0]
    assert (row["text_a"], row["text_b"], row["label"]) == ("甲；乙", "摘要文本", 1)
    bad = [{"id": 0, "abst": "x", "keyword": "甲", "label": "1"}]
    with pytest.raises(PeftbenchError, match=r"train_few_all\.json:1: field 'keyword' must be a list"):
        load("csl", fewclue_dir(tmp_path / "bad", bad, bad))


def test_cluewsc_spans_are_marked():
    text = "就像一片树叶飘入了树林，他走到了我的家人中间。"
    marked = mark_wsc_spans(text, {"span1_index": 4, "span1_text": "树叶", "span2_index": 12, "span2_text": "他"})
    assert marked == "就像一片_树叶_飘入了树林，[他]走到了我的家人中间。"
    # pronoun before the candidate
    marked = mark_wsc_spans("他说小明来了",
                            {"span1_index": 2, "span1_text": "小明", "span2_index": 0, "span2_text": "他"})
    assert marked == "[他]说_小明_来了"
    with pytest.raises(ValueError, match="span1_index"):
        mark_wsc_spans(text, {"span1_index": 5, "span1_text": "树叶", "span2_index": 12, "span2_text": "他"})


def test_cluewsc_bad_offset_names_file_and_line(tmp_path):
    good = {"target": {"span2_index": 0, "span1_index": 2, "span1_text": "小明", "span2_text": "他"}, "idx": 0,
            "label": "true", "text": "他说小明来了"}
    bad = {**good, "target": {**good["target"], "span1_index": 3}}
    with pytest.raises(PeftbenchError, match=r"dev_few_all\.json:2: field 'target\.span1_index'"):
        load("cluewsc2020", fewclue_dir(tmp_path, [good], [good, bad]))


def test_csldcp_chinese_labels(tmp_path):
    recs = [{"content": "摘要", "label": "材料科学与工程", "id": 1}, {"content": "摘要", "label": "植物保护", "id": 2}]
    data = load("csldcp", fewclue_dir(tmp_path, recs, recs))
    assert list(data.splits["train"]["label"]) == [0, 66]


@pytest.mark.parametrize("lines, message", [
    (['{"sentence": "a", "label": "Positive"}', '{"sentence": "b", "label": '],
     r"train_few_all\.json:2: malformed JSON"),
    (['{"sentence": "a", "label": "Positive"}', '{"text": "b", "label": "Positive"}'],
     r"train_few_all\.json:2: field 'sentence' missing"),
    (['{"sentence": "a"}'], r"train_few_all\.json:1: field 'label' missing"),
    (['{"sentence": 5, "label": "Positive"}'], r"train_few_all\.json:1: field 'sentence' must be a string"),
    (['[1, 2]'], r"train_few_all\.json:1: expected a JSON object"),
])
def test_bad_records_name_file_line_field(tmp_path, lines, message):
    write_jsonl(tmp_path / "train_few_all.json", lines)
    write_jsonl(tmp_path / "dev_few_all.json", ['{"sentence": "a", "label": "Positive"}'])
    with pytest.raises(PeftbenchError, match=message):
        load("eprstmt", tmp_path)


def test_missing_dir_empty_split_missing_dev(tmp_path):
    with pytest.raises(PeftbenchError, match="data directory not found"):
        load("eprstmt", tmp_path / "nope")
    with pytest.raises(PeftbenchError, match="no training file found"):
        load("eprstmt", tmp_path)
    write_jsonl(tmp_path / "train.json", ['{"sentence": "a", "label": "Positive"}'])
    with pytest.raises(PeftbenchError, match="has train.json but no dev.json"):
        load("eprstmt", tmp_path)
    write_jsonl(tmp_path / "dev.json", [])
    with pytest.raises(PeftbenchError, match=r"dev\.json: split 'dev' is empty"):
        load("eprstmt", tmp_path)


def test_partially_labeled_test_is_an_error(tmp_path):
    recs = [{"sentence": "a", "label": "Positive"}]
    d = fewclue_dir(tmp_path, recs, recs, test=[{"sentence": "a", "label": "Positive"}, {"sentence": "b"}])
    with pytest.raises(PeftbenchError, match="1 of 2 records have no label"):
        load("eprstmt", d)


def test_clue_release_labels_json_is_checked(tmp_path):
    recs = [{"sentence": "a", "label": "0"}]
    write_jsonl(tmp_path / "train.json", recs)
    write_jsonl(tmp_path / "dev.json", recs)
    write_jsonl(tmp_path / "labels.json", [{"label": "0"}, {"label": "7"}])
    with pytest.raises(PeftbenchError, match=r"labels\.json:2: field 'label': label '7'"):
        load("bustm", tmp_path)


def test_custom_task_jsonl_and_csv(tmp_path):
    recs = [{"q": "问", "a": "答", "y": 1}, {"q": "问二", "a": "答二", "y": 0}]
    fewclue_dir(tmp_path / "j", recs, recs)
    cfg = dict(text_fields=["q", "a"], label_field="y", labels=["0", "1"])
    data = load("custom", tmp_path / "j", **cfg)
    assert list(data.splits["train"]["label"]) == [1, 0] and data.splits["train"]["text_b"][0] == "答"
    (tmp_path / "c").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "c" / f"{split}.csv").write_text("q,a,y\n问,答,1\n问二,答二,0\n", encoding="utf-8")
    data = load("custom", tmp_path / "c", **cfg)
    assert list(data.splits["dev"]["label"]) == [1, 0]
    (tmp_path / "c" / "dev.csv").write_text("q,a,y\n问,答,1\n问二,答二,2\n", encoding="utf-8")
    with pytest.raises(PeftbenchError, match=r"dev\.csv:3: field 'y': label '2'"):
        load("custom", tmp_path / "c", **cfg)
    with pytest.raises(PeftbenchError, match="task.labels"):
        get_spec(TaskConfig(name="custom", text_fields=["q"]))


def test_hub_unreachable_or_absent_is_one_clear_error():
    with pytest.raises(PeftbenchError, match="not on the hub"):
        load_task(TaskConfig(name="eprstmt"))


FEWCLUE_COUNTS = {  # task: (folder, train, dev, test) — counts from ../shared/clue/README.md
    "tnews": ("tnews", 1185, 1098, 2010), "iflytek": ("iflytek", 3024, 1373, 1749), "ocnli": ("ocnli", 160, 160, 2520),
    "csl": ("csl", 160, 160, 2838), "cluewsc2020": ("cluewsc", 160, 159, 976), "eprstmt": ("eprstmt", 160, 160, 610),
    "bustm": ("bustm", 160, 160, 1772), "csldcp": ("csldcp", 2036, 2068, 1784),
}


@needs_shared_clue
@pytest.mark.parametrize("task", sorted(FEWCLUE_COUNTS))
def test_real_fewclue_files(task):
    folder, *counts = FEWCLUE_COUNTS[task]
    data = load(task, SHARED_CLUE / "fewclue" / folder)
    assert [len(data.splits[s]) for s in ("train", "dev", "test")] == counts
    assert data.labeled("test") and not data.dropped
    if task == "tnews":  # balanced test: 134 per class, all 15 classes
        assert sorted(set(data.splits["test"]["label"])) == list(range(15))
    if task == "cluewsc2020":
        assert all("_" in t and "[" in t for t in data.splits["train"]["text_a"])


@needs_shared_clue
def test_real_tnews_label_file_matches_codes():
    path = SHARED_CLUE / "fewclue" / "tnews" / "label_index2en2zh.json"
    codes = [json.loads(line)["label"] for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert tuple(codes) == TNEWS_CODES


# The file names CLUE 1.1 (submission rules of 2021-09-04) and FewCLUE require, per task and data layout.
SUBMISSION_FILES = [
    ("afqmc", "test.json", "afqmc_predict.json"), ("tnews", "test.json", "tnews11_predict.json"),
    ("iflytek", "test.json", "iflytek_predict.json"), ("ocnli", "test.json", "ocnli_50k_predict.json"),
    ("cmnli", "test.json", "cmnli_predict.json"), ("csl", "test.json", "csl_predict.json"),
    ("cluewsc2020", "test.json", "cluewsc11_predict.json"), ("cluener", "test.json", "cluener_predict.json"),
    ("eprstmt", "test_public.json", "eprstmt_predict.json"), ("bustm", "test_public.json", "bustm_predict.json"),
    ("csldcp", "test_public.json", "csldcp_predict.json"), ("tnews", "test_public.json", "tnewsf_predict.json"),
    ("iflytek", "test_public.json", "iflytekf_predict.json"), ("ocnli", "test_public.json", "ocnlif_predict.json"),
    ("csl", "test_public.json", "cslf_predict.json"), ("cluewsc2020", "test_public.json", "cluewscf_predict.json"),
    ("synthetic", "generated", "synthetic_predict.json"),
]


@pytest.mark.parametrize("task, data_file, expected", SUBMISSION_FILES)
def test_submission_file_names_follow_each_leaderboard(task, data_file, expected, tmp_path):
    from peftbench.inference import submission_file

    assert submission_file(task, tmp_path, f"/data/{task}/{data_file}") == expected


def test_only_a_registered_task_names_a_submission_file(tmp_path):
    from peftbench.inference import submission_file

    with pytest.raises(PeftbenchError, match="field 'task': '../../evil' is not a registered task name"):
        submission_file("../../evil", tmp_path, "test.json")
