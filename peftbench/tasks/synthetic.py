"""Synthetic CLUE-format tasks, deterministic by seed, learnable in seconds.

``synthetic`` (topic classification): each of four topics owns six keyword
characters. A sentence is 6-16 filler characters with three or four keywords of
its topic inserted; one record in five also carries a single keyword of another
topic as a distractor. Records look like TNEWS (``label`` as a JSON int,
``label_desc``, ``sentence``, ``id``), so they go through the same loader as
real CLUE files.

``synthetic_ner`` (token classification): filler text with zero to three
entities of three types drawn from small gazetteers, sometimes adjacent or
repeated, written in CLUENER's span format (no ``label`` field when a record
has no entity).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from peftbench.tasks import LAYOUTS, TaskSpec, register_task
from peftbench.tasks.clue import single
from peftbench.tasks.kinds import TOKEN_CLASSIFICATION
from peftbench.tasks.ner import Span, clue_label, scheme_of, span_converter, tag_names

TOPICS = ("体育", "财经", "科技", "娱乐")
KEYWORDS = ("球赛跑冠泳射", "股钱债税涨跌", "芯网算码机器", "星影歌剧综艺")
_COMMON = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所"
    "民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
    "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想"
)
FILLER = "".join(c for c in dict.fromkeys(_COMMON) if not any(c in k for k in KEYWORDS))
SPLIT_SIZES = {"train": 1000, "dev": 300, "test": 300}


def make_records(n: int, rng: random.Random, start_id: int = 0) -> list[dict]:
    records = []
    for i in range(n):
        label = rng.randrange(len(TOPICS))
        chars = [rng.choice(FILLER) for _ in range(rng.randint(6, 16))]
        inserts = [rng.choice(KEYWORDS[label]) for _ in range(rng.randint(3, 4))]
        if rng.random() < 0.2:
            other = rng.choice([k for k in range(len(TOPICS)) if k != label])
            inserts.append(rng.choice(KEYWORDS[other]))
        for ch in inserts:
            chars.insert(rng.randint(0, len(chars)), ch)
        records.append({"label": label, "label_desc": TOPICS[label], "sentence": "".join(chars), "id": start_id + i})
    return records


def generate_splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Disjoint train/dev/test record lists (ids continue across splits)."""
    rng = random.Random(seed)
    out, next_id = {}, 0
    for split, n in (sizes or SPLIT_SIZES).items():
        out[split] = make_records(n, rng, next_id)
        next_id += n
    return out


def write_files(out_dir: str | Path, layout: str = "fewclue", seed: int = 0,
                sizes: dict[str, int] | None = None) -> Path:
    """Write the task as JSON-lines files in the ``clue`` or ``fewclue`` layout.

    The ``clue`` layout mirrors a CLUE release: an unlabeled test.json and a labels.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in generate_splits(seed, sizes).items():
        if layout == "clue" and split == "test":
            records = [{"sentence": r["sentence"], "id": r["id"]} for r in records]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (out / LAYOUTS[layout][split]).write_text(lines, encoding="utf-8")
    if layout == "clue":
        labels = "".join(json.dumps({"label": str(i), "label_desc": t}, ensure_ascii=False) + "\n"
                         for i, t in enumerate(TOPICS))
        (out / "labels.json").write_text(labels, encoding="utf-8")
    return out


NER_GAZETTEER = {
    "name": ("张伟", "李娜", "王芳", "刘洋", "陈杰", "赵敏"),
    "address": ("北京市", "上海", "杭州西湖", "南京路", "广州塔", "成都"),
    "company": ("华为", "阿里巴巴", "腾讯公司", "小米", "百度", "京东"),
}
NER_TYPES = tuple(NER_GAZETTEER)
NER_FILLER = "".join(c for c in FILLER if not any(c in e for es in NER_GAZETTEER.values() for e in es))


def make_ner_records(n: int, rng: random.Random, start_id: int = 0) -> list[dict]:
    records = []
    for i in range(n):
        pieces = [rng.choice(NER_FILLER) for _ in range(rng.randint(8, 20))]
        entities = [(t, rng.choice(NER_GAZETTEER[t])) for t in rng.choices(NER_TYPES, k=rng.randint(0, 3))]
        if entities and rng.random() < 0.2:
            entities.append(entities[0])  # the same entity text twice
        slots = sorted(rng.randint(0, len(pieces)) for _ in entities)
        if len(slots) > 1 and rng.random() < 0.3:
            slots[1] = slots[0]  # two entities side by side
        text, spans, last = "", [], 0
        for slot, (kind, entity) in zip(slots, entities):
            text += "".join(pieces[last:slot])
            spans.append(Span(len(text), len(text) + len(entity) - 1, kind))
            text += entity
            last = slot
        text += "".join(pieces[last:])
        record = {"text": text, "id": start_id + i}
        if spans:
            record["label"] = clue_label(spans, text)
        records.append(record)
    return records


def generate_ner_splits(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    out, next_id = {}, 0
    for split, n in (sizes or {"train": 600, "dev": 200, "test": 200}).items():
        out[split] = make_ner_records(n, rng, next_id)
        next_id += n
    return out


register_task(TaskSpec("synthetic", "synthetic 4-topic CLUE-format task (generated, seed 0)", ("0", "1", "2", "3"),
                       single("sentence"), TOPICS, generate=generate_splits))


def synthetic_ner_spec(task_cfg) -> TaskSpec:
    """Synthetic CLUENER-format NER, 3 entity types (generated, seed 0; or task.data_dir)."""
    return TaskSpec("synthetic_ner", "synthetic CLUENER-format NER (3 entity types)",
                    tag_names(NER_TYPES, scheme_of(task_cfg)), span_converter(NER_TYPES),
                    kind=TOKEN_CLASSIFICATION, entity_types=NER_TYPES, tag_scheme=scheme_of(task_cfg),
                    generate=generate_ner_splits)


register_task(synthetic_ner_spec, name="synthetic_ner")
