"""CLUE and FewCLUE classification tasks.

Each spec handles the quirks of the real files: labels that are JSON ints in one
release and strings in another (compared as strings), TNEWS codes 100-116
without 105 and 111, ``label_desc`` (TNEWS) vs ``label_des`` (IFLYTEK, unused
here), OCNLI/CMNLI ``-`` labels (no annotator majority: dropped and counted), CSL
keyword lists, CLUEWSC spans marked in the text, and CSLDCP labels that are
Chinese discipline names. FewCLUE's tnews/iflytek/ocnli/csl/cluewsc files load
through the same specs as the CLUE releases.
"""

from __future__ import annotations

from peftbench.tasks import Example, TaskSpec, label_field, register_task, text_field

# Submission file names the leaderboards require: CLUE 1.1 versions the tasks whose test set changed
# (CLUE's submission rules, 2021-09-04); FewCLUE marks its versions of CLUE tasks with an "f".
CLUE_SUBMISSION_FILES = {"tnews": "tnews11_predict.json", "cluewsc2020": "cluewsc11_predict.json",
                         "ocnli": "ocnli_50k_predict.json"}
FEWCLUE_SUBMISSION_FILES = {"tnews": "tnewsf_predict.json", "iflytek": "iflytekf_predict.json",
                            "ocnli": "ocnlif_predict.json", "csl": "cslf_predict.json",
                            "cluewsc2020": "cluewscf_predict.json"}

TNEWS_CODES = tuple(str(c) for c in range(100, 117) if c not in (105, 111))
TNEWS_NAMES = tuple("故事 文化 娱乐 体育 财经 房产 汽车 教育 科技 军事 旅游 国际 股票 农业 电竞".split())

IFLYTEK_NAMES = tuple(
    "打车 地图导航 免费WIFI 租车 同城服务 快递物流 婚庆 家政 公共交通 "
    "政务 社区服务 薅羊毛 魔幻 仙侠 卡牌 飞行空战 射击游戏 "
    "休闲益智 动作类 体育竞技 棋牌中心 经营养成 策略 MOBA 辅助工具 "
    "约会社交 即时通讯 工作社交 论坛圈子 婚恋社交 情侣社交 社交工具 "
    "生活社交 微博博客 新闻 漫画 小说 技术 教辅 问答交流 搞笑 杂志 百科 "
    "影视娱乐 求职 兼职 视频 短视频 音乐 直播 电台 K歌 成人 "
    "中小学 职考 公务员 英语 视频教育 高等教育 成人教育 艺术 语言(非英语) "
    "旅游资讯 综合预定 民航 铁路 酒店 行程管理 民宿短租 出国 "
    "工具 亲子儿童 母婴 驾校 违章 汽车咨询 汽车交易 日常养车 "
    "行车辅助 租房 买房 装修家居 电子产品 问诊挂号 养生保健 医疗服务 "
    "减肥瘦身 美妆美业 菜谱 餐饮店 体育咨讯 运动健身 支付 保险 股票 借贷 "
    "理财 彩票 记账 银行 美颜 影像剪辑 摄影修图 相机 绘画 "
    "二手 电商 团购 外卖 电影票务 社区超市 购物咨询 "
    "笔记 办公 日程管理 女性 经营 收款 其他".split()
)

# FewCLUE csldcp/labels_all.txt order.
CSLDCP_LABELS = tuple(
    "材料科学与工程 作物学 口腔医学 药学 教育学 水利工程 理论经济学 "
    "食品科学与工程 畜牧学/兽医学 体育学 核科学与技术 力学 园艺学 "
    "水产 法学 地质学/地质资源与地质工程 石油与天然气工程 农林经济管理 "
    "信息与通信工程 图书馆、情报与档案管理 政治学 电气工程 "
    "海洋科学 民族学 航空宇航科学与技术 化学/化学工程与技术 哲学 "
    "公共卫生与预防医学 艺术学 农业工程 船舶与海洋工程 计算机科学与技术 "
    "冶金工程 交通运输工程 动力工程及工程热物理 纺织科学与工程 "
    "建筑学 环境科学与工程 "
    "公共管理 数学 物理学 林学/林业工程 心理学 "
    "历史学 工商管理 应用经济学 中医学/中药学 天文学 机械工程 "
    "土木工程 光学工程 地理学 农业资源利用 生物学/生物科学与工程 "
    "兵器科学与技术 矿业工程 大气科学 基础医学/临床医学 电子科学与技术 "
    "测绘科学与技术 控制科学与工程 军事学 中国语言文学 "
    "新闻传播学 社会学 地球物理学 植物保护".split()
)

NLI_LABELS = ("entailment", "neutral", "contradiction")


def _record_id(record: dict) -> int | None:
    value = record.get("id", record.get("idx"))
    return value if isinstance(value, int) else None


def single(field: str):
    def convert(record: dict) -> Example:
        return Example(text_field(record, field), label=label_field(record), id=_record_id(record))

    return convert


def pair(first: str, second: str):
    def convert(record: dict) -> Example:
        return Example(text_field(record, first), text_field(record, second), label_field(record), _record_id(record))

    return convert


def csl(record: dict) -> Example:
    """Keywords (a JSON list) as the first segment, the abstract as the second."""
    keywords = record["keyword"]
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise TypeError("field 'keyword' must be a list of strings")
    return Example("；".join(keywords), text_field(record, "abst"), label_field(record), _record_id(record))


def mark_wsc_spans(text: str, target: dict) -> str:
    """Wrap the candidate (span1) in ``_`` and the pronoun (span2) in ``[ ]``, as CLUE's baseline does.

    Offsets are 0-based character indices into ``text``; each must point at its span text.
    """
    spans = []
    for key, (left, right) in (("span1", ("_", "_")), ("span2", ("[", "]"))):
        span_text, start = target[f"{key}_text"], target[f"{key}_index"]
        if not isinstance(start, int) or text[start : start + len(span_text)] != span_text:
            raise ValueError(f"field 'target.{key}_index': {start!r} does not point at {key}_text {span_text!r}")
        spans.append((start, start + len(span_text), left, right))
    # Insert from the right so earlier offsets stay valid.
    marks = sorted([(s, left) for s, _, left, _ in spans] + [(e, right) for _, e, _, right in spans],
                   key=lambda m: m[0], reverse=True)
    for pos, mark in marks:
        text = text[:pos] + mark + text[pos:]
    return text


def cluewsc(record: dict) -> Example:
    target = record["target"]
    if not isinstance(target, dict):
        raise TypeError("field 'target' must be an object")
    return Example(mark_wsc_spans(text_field(record, "text"), target), label=label_field(record), id=_record_id(record))


for spec in (
    TaskSpec("tnews", "TNEWS news-title topic (15 classes)", TNEWS_CODES, single("sentence"),
             TNEWS_NAMES, hub=("clue/clue", "tnews")),
    TaskSpec("iflytek", "IFLYTEK app-description topic (119 classes)", tuple(str(i) for i in range(119)),
             single("sentence"), IFLYTEK_NAMES, hub=("clue/clue", "iflytek")),
    TaskSpec("afqmc", "AFQMC question matching (2 classes)", ("0", "1"), pair("sentence1", "sentence2"),
             hub=("clue/clue", "afqmc")),
    TaskSpec("ocnli", "OCNLI natural language inference (3 classes)", NLI_LABELS, pair("sentence1", "sentence2"),
             hub=("clue/clue", "ocnli"), skip_labels=("-",)),
    TaskSpec("cmnli", "CMNLI natural language inference (3 classes)", NLI_LABELS, pair("sentence1", "sentence2"),
             hub=("clue/clue", "cmnli"), skip_labels=("-",)),
    TaskSpec("csl", "CSL keyword recognition from abstracts (2 classes)", ("0", "1"), csl,
             hub=("clue/clue", "csl")),
    TaskSpec("cluewsc2020", "CLUEWSC2020 pronoun coreference (2 classes)", ("true", "false"), cluewsc,
             hub=("clue/clue", "cluewsc2020")),
    TaskSpec("eprstmt", "FewCLUE EPRSTMT review sentiment (2 classes)", ("Negative", "Positive"),
             single("sentence")),
    TaskSpec("bustm", "FewCLUE BUSTM dialogue short-text matching (2 classes)", ("0", "1"),
             pair("sentence1", "sentence2")),
    TaskSpec("csldcp", "FewCLUE CSLDCP abstract discipline (67 classes)", CSLDCP_LABELS, single("content")),
):
    register_task(spec)
