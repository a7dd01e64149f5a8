"""Backbones and tokenizers: a hub name, a local directory, or a random-init architecture.

``tiny`` is a 2-layer, 128-wide BERT (random init) with a character-level
vocabulary built in memory from the task's training text (saved with the
checkpoint as ``tokenizer.json``), so it runs with no hub. Random init means it measures the
machinery, not a method's accuracy on real language. ``random:NAME`` builds the
architecture of ``NAME`` with random weights the same way (for benchmarks: weights do
not change speed); the names in ``ARCHITECTURES`` need no hub.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import unicodedata
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertTokenizer

from peftbench.errors import PeftbenchError
from peftbench.noise import quiet_loading

TINY = "tiny"
RANDOM = "random:"
TINY_CONFIG = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 512,
               "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.1}
_BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 21128}
ARCHITECTURES = {  # BERT configurations known offline (name -> BertConfig fields)
    "tiny": TINY_CONFIG,
    "mini": {**TINY_CONFIG, "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 1024,
             "initializer_range": 0.02},
    "bert-base-chinese": _BERT_BASE,
    "hfl/chinese-roberta-wwm-ext": _BERT_BASE,
    "hfl/chinese-roberta-wwm-ext-large": {**_BERT_BASE, "hidden_size": 1024, "num_hidden_layers": 24,
                                          "num_attention_heads": 16, "intermediate_size": 4096},
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_char_vocab(texts, min_freq: int = 1) -> list[str]:
    """Special tokens, then every character seen ``min_freq`` times (most frequent first).

    Characters are normalised as the BERT tokenizer normalises them before the vocabulary
    lookup (lower-cased, NFD, accents dropped), so ``é`` counts as ``e`` and a Hangul
    syllable as its jamo. Non-CJK characters also get a ``##`` continuation entry, so a
    word such as ``iPhone`` splits into characters instead of becoming ``[UNK]``.
    """
    counts = Counter(ch for text in texts for ch in _normalize(text) if not ch.isspace())
    chars = [ch for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_freq]
    continuations = ["##" + ch for ch in chars if not _is_cjk(ch)]
    return SPECIAL_TOKENS + chars + continuations


def _normalize(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(ch) != "Mn")


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


def is_random_init(name: str) -> bool:
    return name == TINY or name.startswith(RANDOM)


def load_tokenizer(model_cfg, train_texts):
    """The tokenizer for a run; random-init backbones build a char vocabulary from the training texts.

    A tokenizer without a pad token pads with its end-of-sequence token (as decoder releases such as
    Llama's are used for classification); one with neither is refused.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    if is_random_init(name):
        return char_tokenizer(train_texts)
    key = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    _check_reachable(name, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise PeftbenchError(f"config key '{key}': cannot load tokenizer '{name}' "
                             f"(not a local directory, and the hub said: {_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PeftbenchError(f"config key '{key}': the tokenizer of '{name}' has neither a pad nor an "
                                 "end-of-sequence token, so batches cannot be padded")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class LoadedBase:
    """How a base model was loaded: what a checkpoint needs to rebuild it exactly."""

    source: str  # an absolute directory or a hub name; "" for a backbone built from a config
    stored_dtype: str  # as the source stores its weights
    loaded_dtype: str  # what the run holds them in before mixed precision: float32, or the quantisation
    new_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # what the source lacked, as initialised
    fingerprint: str = ""  # checkpoint.fingerprint of the loaded model, when a checkpoint needs it
    pretrained_fingerprint: str = ""  # the same without the run's new weights and label names
    frozen: set[str] = field(default_factory=set)  # names of the base's parameters the run leaves frozen
    quant_storage: str = "uint8"  # 4-bit: the dtype its codes are packed in (bf16 under FSDP)
    float_weight: Callable[[str], torch.Tensor] | None = None  # quantised: a weight by name as the source holds it


def source_name(name: str) -> str:
    """A local directory as an absolute path (a checkpoint is used from other folders); a hub name as is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def load_model(model_cfg, labels: list[str], tokenizer, auto_class=AutoModelForSequenceClassification,
               save_random_base: Path | None = None, device_map: dict | None = None, float_storage: bool = False):
    """A model of ``auto_class`` (the task kind's: sequence or token classification) with ``len(labels)``
    outputs, quantised per ``model.quantization``, padding with the tokenizer's pad token; returns
    (model, :class:`LoadedBase`). A random-init backbone is written to ``save_random_base`` (float weights,
    before quantisation) when given: it cannot be rebuilt from a name."""
    if not is_random_init(model_cfg.name_or_path):
        _check_reachable(model_cfg.name_or_path, "model.name_or_path")
        return from_pretrained(model_cfg.name_or_path, model_cfg, labels, tokenizer.pad_token_id, auto_class,
                               device_map, float_storage)
    config = random_init_config(model_cfg.name_or_path, len(tokenizer))
    config.update({"pad_token_id": tokenizer.pad_token_id, **_label_kwargs(labels)})
    model = auto_class.from_config(config, **_attention_kwargs(model_cfg))
    if save_random_base is not None:
        model.save_pretrained(str(save_random_base))
    base = LoadedBase("", "float32", "float32")
    if model_cfg.quantization == "none":
        return guard_padding(model), base
    # bitsandbytes quantises while loading. Written directly (save_pretrained writes on global rank 0 only, and
    # every process needs its own copy), to a folder kept while the base's float-weight reader lives (LoftQ)
    tmp = tempfile.mkdtemp(prefix="peftbench-base-")
    try:
        model.config.to_json_file(f"{tmp}/config.json")
        save_model(model, f"{tmp}/model.safetensors", metadata={"format": "pt"})
        model, quantized = from_pretrained(tmp, model_cfg, labels, tokenizer.pad_token_id, auto_class, device_map,
                                           float_storage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(quantized.float_weight, shutil.rmtree, tmp, True)  # also at exit, if still alive
    model.name_or_path = model.config._name_or_path = ""  # built from a config, as unquantised: no path to record
    return model, LoadedBase("", "float32", quantized.loaded_dtype, quant_storage=quantized.quant_storage,
                             float_weight=quantized.float_weight)


def from_pretrained(source, model_cfg, labels: list[str], pad_token_id: int | None,
                    auto_class=AutoModelForSequenceClassification, device_map: dict | None = None,
                    float_storage: bool = False):
    """Load a hub name or directory with the run's labels, attention and quantisation settings; returns
    (model, :class:`LoadedBase`).

    Float weights are loaded in fp32 whatever dtype the source stores (a bf16 release included): trained
    parameters and their optimizer state stay fp32, and mixed precision casts the frozen ones later.
    ``pad_token_id`` (the tokenizer's) fills a config that has none and must equal one that has one.
    """
    quant = quantization_config(model_cfg, float_storage)
    kwargs = {**_label_kwargs(labels), **_attention_kwargs(model_cfg), "dtype": torch.float32,
              "output_loading_info": True}
    if quant is not None:  # float parts (embeddings, norms, head) stay fp32; ``device_map`` puts a copy on each device
        kwargs.update(quantization_config=quant, device_map=device_map)
    try:
        stored = AutoConfig.from_pretrained(str(source)).dtype
        with quiet_loading():
            model, info = auto_class.from_pretrained(str(source), **kwargs)
    except OSError as exc:
        raise PeftbenchError(f"config key 'model.name_or_path': cannot load '{source}' "
                             f"(not a local directory, and the hub said: {_first_line(exc)})") from None
    if quant is not None:
        keep_4bit_training_layout(model)
    _align_pad_token(model.config, pad_token_id, source)
    state = model.state_dict()
    new = {name: state[name].detach().to("cpu", copy=True) for name in sorted(info["missing_keys"]) if name in state}
    base = LoadedBase(source_name(str(source)), str(stored or torch.float32).removeprefix("torch."),
                      quantization_name(model_cfg) if quant is not None else "float32", new,
                      quant_storage="bf16" if float_storage and model_cfg.quantization == "4bit" else "uint8",
                      float_weight=float_weights(source, model) if quant is not None else None)
    return guard_padding(model), base


def float_weights(source, model) -> Callable[[str], torch.Tensor]:
    """A reader of the source's weights by the loaded model's parameter names, one tensor at a time from its
    safetensors files (a hub name: from the files the load cached), found on the first read; LoftQ measures
    each quantised layer's error against them. A name is looked up as it is, then without the model's base
    prefix (``bert.``), as a bare encoder's checkpoint stores it."""
    from safetensors import safe_open

    prefix = f"{model.base_model_prefix}."

    @functools.cache
    def find() -> tuple[Path, dict[str, Path]]:
        folder = Path(str(source)).expanduser()
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            try:
                folder = Path(snapshot_download(str(source), local_files_only=True,
                                                allow_patterns=["*.safetensors*"]))
            except (OSError, ValueError) as err:  # not cached; not a hub name
                raise PeftbenchError(f"{source}: its cached files cannot be found ({_first_line(err)}); LoftQ reads "
                                     "the float weights there") from None
        index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
        if index.is_file():
            shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return folder, {name: folder / shard for name, shard in shards.items()}
        if single.is_file():
            with safe_open(str(single), "pt") as f:
                return folder, dict.fromkeys(f.keys(), single)
        return folder, {}

    def read(name: str) -> torch.Tensor:
        folder, files = find()
        if not files:
            raise PeftbenchError(f"{folder}: no model.safetensors (or index) to read the float weights from, which "
                                 "LoftQ needs; save the backbone with safetensors")
        for key in (name, name.removeprefix(prefix)):
            if key in files:
                with safe_open(str(files[key]), "pt") as f:
                    return f.get_tensor(key)
        raise PeftbenchError(f"{folder}: no weight '{name}' in its safetensors files (LoftQ reads the float "
                             "weights there)")
    return read


def _align_pad_token(config, pad_token_id: int | None, source) -> None:
    """Sequence classification pools the last token that is not the config's pad id (decoders) and every
    padded batch uses the tokenizer's: the two must be one id."""
    config = config.get_text_config()
    if pad_token_id is None:
        raise PeftbenchError(f"{source}: the tokenizer has no pad token")
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id
    elif config.pad_token_id != pad_token_id:
        raise PeftbenchError(f"{source}/config.json: field 'pad_token_id' is {config.pad_token_id} but the "
                             f"tokenizer pads with id {pad_token_id}; classification would read padding as text: "
                             "make them agree")


def without_peft(model):
    """The transformers model inside a PEFT wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merge_and_unload(model):
    """PEFT's ``merge_and_unload``, then any wrapper it left replaced by what it wraps (LN tuning's own unloading
    skips the trained head's ``modules_to_save`` wrapper): a plain transformers model."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    model = model.merge_and_unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, AuxiliaryTrainingWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None))
    return model


def guard_padding(model):
    """Make a batch's logits independent of how it is padded.

    A causal decoder gets position ids counted from the attention mask (real tokens at 0..T-1 on either
    padding side; transformers would number the padding too, which moves every real token when padding is
    on the left). Its sequence-classification head pools the last token that is not padding, which it can
    only find from ``input_ids``: given embeddings instead (prompt tuning), each row's trailing padding
    is moved to its front first, so that the last position is the last real token. An encoder that reads
    its first token and has absolute positions (BERT) cannot be padded on the left: a left-padded batch is
    refused in evaluation (training batches are peftbench's own, padded on the right). Returns ``model``.
    """
    backbone = model.base_model if model.base_model is not model else model
    if getattr(backbone, "_peftbench_padding", False):
        return model
    causal = any(getattr(m, "is_causal", False) for m in backbone.modules())

    def positions_from_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        if causal:
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
                return args, kwargs
        elif (not module.training and not torch.compiler.is_exporting()  # an exported graph cannot refuse
              and bool((mask[:, 1:].int() > mask[:, :-1].int()).any())):
            raise PeftbenchError(f"a left-padded batch: {type(model).__name__} reads its first token and has "
                                 "absolute positions, so pad on the right (tokenizer.padding_side = 'right')")
        return None

    def last_token_last(module, args, kwargs):
        embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        if args or kwargs.get("input_ids") is not None or embeds is None or mask is None or mask.dim() != 2:
            return None
        index = torch.arange(mask.shape[1], device=mask.device)
        trailing = mask.shape[1] - 1 - (index * mask.long()).argmax(-1)
        order = index[None] - trailing[:, None]  # rotate each row right by its trailing padding
        order = torch.where(order < 0, order + mask.shape[1], order)
        kwargs["inputs_embeds"] = embeds.gather(1, order[..., None].expand_as(embeds))
        kwargs["attention_mask"] = mask.gather(1, order)
        return args, kwargs

    backbone.register_forward_pre_hook(positions_from_mask, with_kwargs=True)
    if causal and type(model).__name__.endswith("ForSequenceClassification"):
        model.register_forward_pre_hook(last_token_last, with_kwargs=True)
    backbone._peftbench_padding = True
    return model


def keep_4bit_training_layout(model) -> None:
    """Keep bitsandbytes' 4-bit CPU weights in the layout its autograd path reads.

    On a CPU with AVX512-BF16, ``Linear4bit`` repacks its weight into an inference-only layout on
    the first forward in eval mode and never converts back, so training after the first
    evaluation fails ("a view of a leaf Variable ... in-place operation"). Turning that repacking
    off keeps one layout for training and evaluation; on other CPUs and on GPUs nothing changes.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


QUANT_SKIP_MODULES = ["classifier", "score", "pooler.dense"]  # stay in float: the trained head, BERT's pooler
QUANT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def quantization_config(model_cfg, float_storage: bool = False):
    """bitsandbytes settings for ``model.quantization`` (None for ``none``).

    The classification head (and BERT's pooler in front of it) is kept out of quantisation:
    PEFT trains the head, and an int8 head fails with "only Tensors of floating point dtype
    can require gradients" when it is made trainable. ``float_storage``: 4-bit codes packed in bf16
    tensors instead of uint8 (the same codes), so that FSDP shards them like any weight (FSDP-QLoRA).
    """
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "none":
        return None
    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quant_4bit_type,
                              bnb_4bit_compute_dtype=QUANT_DTYPES[model_cfg.quant_4bit_compute_dtype],
                              bnb_4bit_use_double_quant=model_cfg.quant_4bit_double,
                              bnb_4bit_quant_storage=torch.bfloat16 if float_storage else torch.uint8,
                              llm_int8_skip_modules=QUANT_SKIP_MODULES)


def quantization_name(model_cfg) -> str:
    """``none``, ``8bit``, or e.g. ``4bit-nf4-bf16(+double)``: the quantisation a record states."""
    if model_cfg.quantization != "4bit":
        return model_cfg.quantization
    double = "+double" if model_cfg.quant_4bit_double else ""
    return f"4bit-{model_cfg.quant_4bit_type}-{model_cfg.quant_4bit_compute_dtype}{double}"


def _label_kwargs(labels: list[str]) -> dict:
    return dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)})


def _attention_kwargs(model_cfg) -> dict:
    return {"attn_implementation": model_cfg.attn_implementation} if model_cfg.attn_implementation else {}


def random_init_architecture(name: str) -> dict:
    """A random-init backbone's architecture as a plain dict, independent of the transformers version's config
    defaults: a built-in one's fields, or the differences from its config class's defaults."""
    arch = TINY if name == TINY else name.removeprefix(RANDOM)
    if arch in ARCHITECTURES:
        return {"builtin": arch, **ARCHITECTURES[arch]}
    return random_init_config(name, 0).to_diff_dict()


def random_init_config(name: str, vocab_size: int):
    """``tiny``, ``random:<name in ARCHITECTURES>`` (no hub) or ``random:<hub name or directory>`` (its config)."""
    arch = TINY if name == TINY else name.removeprefix(RANDOM)
    if arch in ARCHITECTURES:
        fields = ARCHITECTURES[arch]
        return BertConfig(**{**fields, "vocab_size": max(vocab_size, fields.get("vocab_size", 0))})
    try:
        config = AutoConfig.from_pretrained(arch)
    except OSError as exc:
        raise PeftbenchError(f"config key 'model.name_or_path': no configuration for '{arch}' (built in: "
                             f"{', '.join(ARCHITECTURES)}; the hub said: {_first_line(exc)})") from None
    config.vocab_size = max(vocab_size, config.vocab_size)
    return config


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
