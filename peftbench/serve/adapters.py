"""The adapters a server holds: loaded from checkpoints, on a shared base where their method allows it."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftbench import checkpoint
from peftbench.config import resolve
from peftbench.errors import PeftbenchError
from peftbench.inference import load, load_base, loading
from peftbench.mixed import NotShareable, SharedBase
from peftbench.tasks.kinds import KINDS, TaskKind


@dataclass
class Adapter:
    name: str
    meta: dict
    kind: TaskKind
    tokenizer: object
    model: torch.nn.Module | None = None  # a model of its own
    shared: SharedBase | None = None  # else: the base it shares, where it is the slot called ``name``
    members: list["Adapter"] = field(default_factory=list)  # an ensemble's: their probabilities are averaged
    own_reason: str | None = None  # why it did not join a shared base

    @property
    def batch_key(self) -> tuple:
        """Jobs with one key run in one forward pass: the adapters of one shared base mix, those with n virtual
        tokens (prompt tuning) apart from the others (in one pass, every row would be padded by n); a model of its
        own runs alone; an ensemble's jobs run together, one pass per member."""
        if self.members:
            return ("ensemble", self.name)
        if self.shared is None:
            return ("own", id(self.model))
        prompt = self.shared.slots[self.name].prompt
        return ("shared", id(self.shared), 0 if prompt is None else prompt.shape[0])

    def describe(self) -> dict:
        return {**describe_checkpoint(self.name, self.meta), "method": "ensemble" if self.members else
                self.meta["method"], "shares_base": self.shared is not None,
                **({"own_model": self.own_reason} if self.own_reason else {}),
                **({"members": [a.describe() for a in self.members]} if self.members else {})}


def describe_checkpoint(name: str, meta: dict) -> dict:
    """What ``GET /v1/adapters`` tells of a checkpoint from its metadata alone."""
    return {"name": name, "task": meta["task"], "method": meta["method"], "kind": meta["kind"],
            "labels": meta["labels"], "label_names": meta["label_names"], "text_pairs": meta["pair"],
            "run_id": meta["run_id"], "base": checkpoint.pretrained_fingerprint(meta)[:12] if meta["base"] else None}


def load_adapters(checkpoints: dict[str, str | Path | list], device: str = "cpu",
                  bases: dict | None = None) -> dict[str, Adapter]:
    """Load every checkpoint (name -> directory, or a list of directories: an ensemble). An adapter joins the
    shared base of the pretrained base it was trained on (checked by fingerprint) when its method keeps that
    base frozen; every other checkpoint gets a model of its own. ``bases``: the shared bases, by group (filled)."""
    singles = {}
    for name, ckpt in checkpoints.items():
        for i, path in enumerate(ckpt if isinstance(ckpt, list) else [ckpt]):
            singles[f"{name}#{i}" if isinstance(ckpt, list) else name] = path
    bases = {} if bases is None else bases
    loaded = {name: load_adapter(name, Path(path), device, bases) for name, path in singles.items()}
    adapters = {}
    for name, ckpt in checkpoints.items():
        if not isinstance(ckpt, list):
            adapters[name] = loaded[name]
            continue
        members = [loaded[f"{name}#{i}"] for i in range(len(ckpt))]
        first = members[0]
        for path, member in zip(ckpt[1:], members[1:]):
            same = all(member.meta[k] == first.meta[k] for k in ("task", "kind", "labels", "max_length", "pair"))
            if not same or member.tokenizer.get_vocab() != first.tokenizer.get_vocab():
                raise PeftbenchError(f"ensemble '{name}': {path} has another task, labels, tokenizer or max_length "
                                     f"than {ckpt[0]}; a served ensemble's members share all of them")
        adapters[name] = Adapter(name, first.meta, first.kind, first.tokenizer, members=members)
    return adapters


def load_adapter(name: str, ckpt: Path, device: str, bases: dict[tuple, SharedBase | NotShareable]) -> Adapter:
    """One checkpoint, as a slot of its shared base in ``bases`` (by base fingerprint, padding id and attention;
    created on first use) when it can share it, else as a model of its own."""
    return attach(read_adapter(name, ckpt, device, bases))


@dataclass
class Loaded:
    """A checkpoint loaded as a model of its own, and the shared base it may join (or why it cannot)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    meta: dict
    base: SharedBase | None
    reason: str | None = None


def read_adapter(name: str, ckpt: Path, device: str, bases: dict[tuple, SharedBase | NotShareable]) -> Loaded:
    """The slow half of :func:`load_adapter` (disk, a model built), which changes no model in use: a server runs
    it beside its forward passes, and :func:`attach` on their thread."""
    model, tokenizer, meta = load(ckpt, device)
    model_cfg = resolve(meta["config"]).model
    if meta["base"] is None:
        return Loaded(name, model, tokenizer, meta, None, "a whole model (no base)")
    if model_cfg.quantization != "none":
        return Loaded(name, model, tokenizer, meta, None, f"a {model_cfg.quantization} base")
    group = (checkpoint.pretrained_fingerprint(meta), tokenizer.pad_token_id, model_cfg.attn_implementation)
    if group not in bases:
        try:
            with loading(ckpt):
                bases[group] = SharedBase(load_base(ckpt, meta, tokenizer.pad_token_id, device).eval())
        except NotShareable as exc:
            bases[group] = exc
    found = bases[group]
    return Loaded(name, model, tokenizer, meta, *((None, str(found)) if isinstance(found, NotShareable) else (found,)))


def attach(loaded: Loaded) -> Adapter:
    """The adapter: a slot of its shared base when it can be one, else its model."""
    kind = KINDS[loaded.meta["kind"]]
    reason = loaded.reason
    if loaded.base is not None:
        try:
            loaded.base.add(loaded.name, loaded.model)
            return Adapter(loaded.name, loaded.meta, kind, loaded.tokenizer, shared=loaded.base)
        except NotShareable as exc:
            reason = str(exc)
    return Adapter(loaded.name, loaded.meta, kind, loaded.tokenizer, loaded.model, own_reason=reason)


def detach(adapter: Adapter) -> None:
    """Let an adapter's tensors go (its slot, or its model once nothing refers to it)."""
    if adapter.shared is not None:
        adapter.shared.remove(adapter.name)


def describe_memory(adapters: dict[str, Adapter]) -> str:
    """A line: how many adapters run on how many shared bases, how many in models of their own (and why)."""
    loaded = [m for a in adapters.values() for m in (a.members or [a])]  # an ensemble: its members
    shared = [a for a in loaded if a.shared is not None]
    own = [a for a in loaded if a.shared is None]
    why = "; ".join(f"{a.name}: {a.own_reason}" for a in own)
    own_bytes = sum(a.shared.slots[a.name].nbytes() for a in shared)
    return (f"{len(adapters)} adapters: {len(shared)} on {len({id(a.shared) for a in shared})} shared bases "
            f"({own_bytes / 2**20:.1f} MiB of their own tensors), {len(own)} in models of their own"
            + (f" ({why})" if why else ""))


def parse_checkpoints(specs: list[str]) -> dict[str, str | list[str]]:
    """``[NAME=]CKPT`` arguments as name -> directory (a bare path is named after its run folder);
    ``NAME=CKPT+CKPT+...`` names an ensemble (a list)."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec).resolve().parent.name if Path(spec).name == "checkpoint" else Path(spec).name
        if name in out:
            raise PeftbenchError(f"adapter name '{name}' given twice: name them, NAME=CKPT")
        if "#" in name:
            raise PeftbenchError(f"adapter name '{name}': '#' is kept for the members of an ensemble")
        out[name] = path.split("+") if sep and "+" in path else path
    return out


