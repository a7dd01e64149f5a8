"""Several processes: which engine runs a fine-tuning, and everything the engine changes, in one place.

- ``none``: one process.
- ``ddp``: Accelerate's DistributedDataParallel: every process holds the whole model; gradients are averaged.
- ``fsdp2``: PyTorch FSDP2, applied here: ``fully_shard`` on each transformer layer and on the root, over
  the mesh of the launched processes (gloo on CPU, NCCL on GPU). Every parameter is sharded on its own (its
  rows split across the processes), frozen and trained alike, so a method's modules may sit in any unit.
  Accelerate still launches the processes, runs autocast and shards the data. Accelerate 1.15 turns FSDP on
  only from GPU states, so peftbench reads the FSDP settings of the launch config (``ACCELERATE_USE_FSDP``
  and ``FSDP_*``, set by ``accelerate launch --config_file fsdp.yaml``) or ``train.sharding=fsdp2``, and
  takes FSDP over on CPU and GPU alike.
- ``deepspeed``: Accelerate's DeepSpeed ZeRO (GPU only).

The loop never asks which engine runs; the recipe asks this module to shard, prepare, gather for saving and
measure what each process holds.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from peftbench.errors import Interrupted, LostProcess, MainProcessFailed, PeftbenchError

ENGINES = ("none", "ddp", "fsdp2", "deepspeed")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_taken: dict[str, str] = {}  # the FSDP settings of the launch, taken out of the environment at the first run


@dataclass(frozen=True)
class Launch:
    """How this run's processes were launched, and the engine that runs them."""

    engine: str  # one of ENGINES
    processes: int = 1
    machines: int = 1
    reshard_after_forward: bool = True  # FSDP2: free each layer's gathered weights after its forward
    layer_classes: tuple[str, ...] = ()  # FSDP2: module classes sharded one by one (default: the model's layers)
    offload_params: bool = False  # FSDP2: keep the shards in CPU memory (GPU)
    activation_checkpointing: bool = False  # as the launch config asks (train.gradient_checkpointing must agree)
    settings: dict = field(default_factory=dict)  # the launch config's FSDP_* values, as given

    @property
    def sharded(self) -> bool:
        """Whether the model is split over the processes (it then runs only with all of them)."""
        return self.engine in ("fsdp2", "deepspeed")

    def describe(self) -> dict:
        """What a record says about the launch."""
        return {"engine": self.engine, "num_processes": self.processes, "num_machines": self.machines}


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def take_fsdp_launch() -> dict[str, str]:
    """The FSDP settings ``accelerate launch`` put in the environment, removed from it (once per process, then
    remembered): Accelerate would otherwise switch a GPU state to its own FSDP, and transformers would load the
    weights of every process but the first on the meta device."""
    if not _taken and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        _taken.update({k: os.environ.pop(k) for k in list(os.environ) if k.startswith("FSDP_")})
        _taken["ACCELERATE_USE_FSDP"] = os.environ.pop("ACCELERATE_USE_FSDP")
    return _taken


def launch(sharding: str = "auto") -> Launch:
    """The launch of this process (``torchrun`` and ``accelerate launch`` set ``WORLD_SIZE`` and
    ``LOCAL_WORLD_SIZE``) and the engine ``train.sharding`` asks for."""
    fsdp = take_fsdp_launch()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    machines = max(1, processes // int(os.environ.get("LOCAL_WORLD_SIZE", str(processes))))
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if sharding == "fsdp2" and deepspeed:
        raise PeftbenchError("train.sharding=fsdp2 under a DeepSpeed launch config: one engine shards; launch with "
                             "recipes/accelerate/fsdp.yaml, or leave train.sharding at auto")
    if sharding == "ddp" and deepspeed:  # Accelerate takes DeepSpeed from the launch whatever the recipe says
        raise PeftbenchError("train.sharding=ddp under a DeepSpeed launch config: DeepSpeed would wrap the model "
                             "anyway; launch with recipes/accelerate/multi_gpu.yaml, or leave train.sharding at auto")
    if sharding == "fsdp2" or (sharding == "auto" and fsdp):
        classes = tuple(c.strip() for c in fsdp.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
        return Launch("fsdp2", processes, machines, _flag(fsdp.get("FSDP_RESHARD_AFTER_FORWARD"), True), classes,
                      _flag(fsdp.get("FSDP_OFFLOAD_PARAMS"), False),
                      _flag(fsdp.get("FSDP_ACTIVATION_CHECKPOINTING"), False), dict(fsdp))
    if deepspeed:
        return Launch("deepspeed", processes, machines)
    return Launch("ddp" if processes > 1 else "none", processes, machines)


PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout", "connection refused",
             "communicator was aborted", "socket closed")  # gloo, NCCL and the TCP store saying a process is gone


@contextlib.contextmanager
def naming_lost_processes(process_index: int, processes: int, dist_timeout: int):
    """A collective that fails because another process died or stopped answering raises :class:`LostProcess`,
    saying which process noticed and what it waited for, with the backend's own line (gloo names the peer)."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError, DistNetworkError and gloo's plain RuntimeError
        text = " ".join(str(exc).split())
        backend = isinstance(exc, torch.distributed.DistError) or "gloo" in text.lower() or "nccl" in text.lower()
        if processes == 1 or isinstance(exc, (Interrupted, MainProcessFailed)) or not backend or \
                not any(cue in text.lower() for cue in PEER_LOST):
            raise
        raise LostProcess(f"process {process_index} of {processes} lost another process of the group (it died, or "
                          f"did not answer within train.dist_timeout={dist_timeout} s): {text[:400]}") from exc


def check(cfg, run: Launch, cuda: bool, reads_gradients: bool, accelerator=None) -> None:
    """Refuse at start-up what this engine cannot run, in one line saying why (before data or model load)."""
    quantized = cfg.model.quantization
    if run.sharded and (cfg.train.save_state_every or cfg.train.resume):
        raise PeftbenchError(f"train.save_state_every / train.resume under {run.engine}: a resumable state is saved "
                             "per process from whole weights and optimizer state, which sharding splits; launch with "
                             "recipes/accelerate/multi_gpu.yaml (DDP) or leave both keys unset")
    if run.engine == "deepspeed":
        if not cuda:
            raise PeftbenchError("a DeepSpeed launch config needs GPUs (DeepSpeed runs on CUDA devices); on this "
                                 "machine shard with recipes/accelerate/fsdp.yaml (FSDP2 runs on CPU too)")
        if quantized != "none":
            raise PeftbenchError(f"model.quantization={quantized} cannot run under DeepSpeed: bitsandbytes "
                                 "weights are not partitioned by ZeRO; launch with recipes/accelerate/fsdp.yaml "
                                 "(4-bit) or multi_gpu.yaml (one quantised copy per GPU)")
        if reads_gradients:
            raise PeftbenchError(f"method '{cfg.method.name}' cannot run under DeepSpeed ZeRO: it reads whole "
                                 "gradients after the backward pass, which ZeRO partitions across processes; "
                                 "launch with recipes/accelerate/fsdp.yaml or multi_gpu.yaml")
        if cfg.train.adversarial != "none":
            raise PeftbenchError(f"train.adversarial={cfg.train.adversarial} cannot run under DeepSpeed: its engine "
                                 "steps the optimizer inside every backward pass and keeps the gradients in its own "
                                 "buffers, so the adversarial passes would be steps of their own; launch with "
                                 "recipes/accelerate/fsdp.yaml or multi_gpu.yaml")
        ds = accelerator.state.deepspeed_plugin
        if ds.zero_stage == 3:
            raise PeftbenchError("DeepSpeed ZeRO-3 cannot run peftbench's loop: it partitions every weight, and a run "
                                 "keeps its best epoch by copying the weights it trains; launch with "
                                 "recipes/accelerate/fsdp.yaml (FSDP2 shards weights too and keeps the best epoch "
                                 "shard by shard) or deepspeed_zero2.yaml")
        accum = ds.deepspeed_config.get("gradient_accumulation_steps", "auto")
        if accum != "auto" and accum != cfg.train.grad_accum_steps:
            raise PeftbenchError(f"DeepSpeed config has gradient_accumulation_steps={accum} but train.grad_accum_steps="
                                 f"{cfg.train.grad_accum_steps}: set them equal (DeepSpeed's value would win)")
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size  # the model is prepared alone
        return
    if run.engine != "fsdp2":
        return
    if quantized == "8bit":
        raise PeftbenchError("model.quantization=8bit cannot run under FSDP: LLM.int8 weights keep their int8 codes "
                             "and row scales as attributes that sharding drops; use model.quantization=4bit (its "
                             "codes are packed in bf16 tensors that shard like any weight: FSDP-QLoRA) or launch "
                             "with recipes/accelerate/multi_gpu.yaml (one 8-bit copy per GPU)")
    if quantized == "4bit" and cfg.train.mixed_precision == "fp16":
        raise PeftbenchError("model.quantization=4bit with train.mixed_precision=fp16 cannot run under FSDP: the "
                             "4-bit codes are packed in bf16 tensors, which FSDP would cast to fp16 as numbers; use "
                             "train.mixed_precision=bf16 (or no)")
    if run.activation_checkpointing and not cfg.train.gradient_checkpointing:
        raise PeftbenchError("the FSDP launch config sets fsdp_activation_checkpointing: true but the recipe has "
                             "train.gradient_checkpointing=false: set them alike (the recipe's key decides)")


def shard(model: torch.nn.Module, run: Launch, mixed_precision: str, device: torch.device,
          replicate: set[torch.nn.Parameter] = frozenset()) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` each layer (the launch config's classes, else the model's repeated blocks among
    its ``_no_split_modules``: the layers, not the embeddings a prompt method also holds), then the root. Under
    mixed precision the gathered weights compute in bf16/fp16 and gradients are reduced in fp32; the shards of
    trained parameters stay fp32 for the optimizer.

    ``replicate``: parameters kept whole on every process (a method that reads whole gradients after the
    backward pass: AdaLoRA's budget), their gradients averaged over the processes as DDP averages them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    declared = next((m._no_split_modules for m in model.modules() if getattr(m, "_no_split_modules", None)), ())
    counts = Counter(type(m).__name__ for m in model.modules())
    classes = set(run.layer_classes) or {c for c in declared if counts[c] > 1}
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise PeftbenchError(f"FSDP: no module of this model is of the classes to shard one by one "
                             f"({sorted(classes) or 'none named'}); set fsdp_transformer_layer_cls_to_wrap in the "
                             "launch config to the model's layer class (BertLayer, Qwen2DecoderLayer, ...)")
    if not torch.distributed.is_initialized():  # one process, not launched: a group of one
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (run.processes,))
    dtype = COMPUTE_DTYPES.get(mixed_precision)
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
               if dtype else MixedPrecisionPolicy()}
    if run.offload_params:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, reshard_after_forward=run.reshard_after_forward,
                    ignored_params=set(replicate) & set(layer.parameters()), **options)
    fully_shard(model, reshard_after_forward=False, ignored_params=set(replicate), **options)
    for param in replicate:
        param.data = param.data.to(device)
        param.register_post_accumulate_grad_hook(_averaged(model, run.processes))
    return model


def _averaged(model: torch.nn.Module, processes: int):
    """A gradient hook that averages a replicated parameter's gradient over the processes, on the micro-batches
    that synchronise (``prepare``'s ``no_sync`` turns it off on the others, as it turns FSDP's reduction off)."""
    def hook(param: torch.nn.Parameter) -> None:
        if getattr(model, "_syncs_gradients", True) and processes > 1:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(processes)
    return hook


def prepare(accelerator, run: Launch, model, optimizer):
    """Accelerate's preparation; a sharded model keeps its FSDP2 form (autocast added, no DDP wrapper), and
    skips gradient reduction on the micro-batches of an accumulation that do not step (Accelerate looks for
    ``no_sync``)."""
    if run.engine != "fsdp2":
        return accelerator.prepare(model, optimizer)
    model = accelerator.prepare_model(model, evaluation_mode=True)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        model._syncs_gradients = False
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
            model._syncs_gradients = True

    model.no_sync = no_sync
    return model, accelerator.prepare_optimizer(optimizer)


def reshard(model: torch.nn.Module) -> torch.nn.Module:
    """Put every FSDP2 unit of ``model`` back in its sharded state (the root keeps its weights gathered after a
    forward pass): its parameters are then the shards, to copy, restore or count. A no-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


@contextlib.contextmanager
def whole_root(model: torch.nn.Module):
    """Within the block the FSDP2 root's own weights are gathered (every process enters it: the gathering is
    collective), as in a forward pass; a no-op for other models."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's data on this process: its shard under FSDP2 (a DTensor), else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gather_state(model: torch.nn.Module, keep: Callable[[str], bool], main: bool) -> dict[str, torch.Tensor]:
    """The tensors of ``model.state_dict()`` whose names ``keep`` accepts, whole and on the CPU, on the main process
    (the others take part in the gathering and get an empty dict). Every process must call it."""
    out = {}
    for name, tensor in reshard(model).state_dict().items():
        if not keep(name):
            continue
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if main:
            out[name] = whole.detach().to("cpu", copy=True)
    return out


def held_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """Bytes this process holds of the weights, the gradients of the trained ones and the optimizer state (local
    shards under FSDP2), counted from the tensors themselves."""
    params = list(reshard(model).parameters())
    state = getattr(optimizer, "optimizer", optimizer).state
    return {"weights": sum(_bytes(p) for p in params),
            "gradients": sum(_bytes(p) for p in params if p.requires_grad),
            "optimizer": sum(_bytes(t) for s in state.values() for t in s.values() if torch.is_tensor(t))}


def _bytes(tensor: torch.Tensor) -> int:
    data = local(tensor)
    return data.numel() * data.element_size()
