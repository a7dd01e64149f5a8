"""Launch configurations: the Accelerate configs load; what a sharding strategy cannot run is refused at start-up."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file

from peftbench import config, distributed
from peftbench.errors import PeftbenchError
from peftbench.methods import get_method

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


@pytest.mark.parametrize(("name", "kind", "processes"), [
    ("single_gpu.yaml", "NO", 1), ("multi_gpu.yaml", "MULTI_GPU", 8), ("fsdp.yaml", "FSDP", 8),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 8), ("two_nodes.yaml", "MULTI_GPU", 16)])
def test_accelerate_configs_load_and_are_documented(name, kind, processes):
    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type == kind and cfg.num_processes == processes
    assert f"--config_file recipes/accelerate/{name}" in DOCS.read_text(encoding="utf-8")


def fake_accelerator(accum=1, stage=2):
    plugin = SimpleNamespace(deepspeed_config={"gradient_accumulation_steps": accum}, zero_stage=stage)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(("engine", "overrides", "cuda", "message"), [
    ("deepspeed", ["method.name=lora", "model.quantization=8bit"], True, "cannot run under DeepSpeed"),
    ("deepspeed", ["method.name=adalora"], True, "'adalora' cannot run under DeepSpeed ZeRO: it reads whole gradients"),
    ("deepspeed", ["method.name=lora", "train.grad_accum_steps=4"], True, "gradient_accumulation_steps=1 but"),
    ("deepspeed", ["method.name=lora"], False, "a DeepSpeed launch config needs GPUs"),
    ("deepspeed", ["method.name=lora", "train.adversarial=fgm"], True, "train.adversarial=fgm cannot run under "
                                                                       "DeepSpeed: its engine steps the optimizer"),
    ("fsdp2", ["method.name=lora", "model.quantization=8bit"], True, "8bit cannot run under FSDP"),
    ("fsdp2", ["method.name=lora", "train.gradient_checkpointing=false"], True, "fsdp_activation_checkpointing"),
    ("fsdp2", ["method.name=lora", "model.quantization=4bit", "train.mixed_precision=fp16",
               "train.gradient_checkpointing=true"], True, "4bit with train.mixed_precision=fp16 cannot run"),
])
def test_engines_refuse_what_they_cannot_run(engine, overrides, cuda, message):
    cfg = config.load(None, overrides)
    launch = distributed.Launch(engine, 2, activation_checkpointing=True)
    with pytest.raises(PeftbenchError, match=message):
        distributed.check(cfg, launch, cuda, get_method(cfg.method.name).reads_gradients, fake_accelerator())


def test_zero3_is_refused_with_the_reason():
    with pytest.raises(PeftbenchError, match="ZeRO-3 cannot run peftbench's loop: it partitions every weight"):
        distributed.check(config.load(None, ["method.name=lora"]), distributed.Launch("deepspeed", 2), True, False,
                          fake_accelerator(stage=3))


def test_one_engine_shards(monkeypatch):
    monkeypatch.setattr(distributed, "_taken", {})
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.launch().engine == "deepspeed"
    with pytest.raises(PeftbenchError, match="train.sharding=fsdp2 under a DeepSpeed launch config"):
        distributed.launch("fsdp2")
    with pytest.raises(PeftbenchError, match="train.sharding=ddp under a DeepSpeed launch config: DeepSpeed would"):
        distributed.launch("ddp")  # not a record that says deepspeed for a recipe that asked for ddp


def test_pretraining_is_refused_under_a_sharding_launch(monkeypatch, tmp_path):
    from peftbench.pretrain import load_config, pretrain

    monkeypatch.setattr(distributed, "_taken", {})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    (tmp_path / "corpus.txt").write_text("股钱债涨跌\n", encoding="utf-8")
    with pytest.raises(PeftbenchError, match="peftbench pretrain runs in one process or under DDP, not under fsdp2"):
        pretrain(load_config(None, [f"corpus.files=[{tmp_path / 'corpus.txt'}]", "model.from_scratch=true",
                                    f"output_dir={tmp_path / 'out'}"]))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("engine", "method"), [
    ("fsdp2", "full"), ("fsdp2", "lora"), ("fsdp2", "adapter"), ("deepspeed", "lora"), ("deepspeed", "full"),
    ("deepspeed", "prefix"), ("ddp", "adalora"), ("ddp", "lora")])
def test_what_an_engine_can_run_starts(engine, method):
    accelerator = fake_accelerator()
    cfg = config.load(None, [f"method.name={method}", "train.batch_size=16"])
    distributed.check(cfg, distributed.Launch(engine, 2), True, get_method(method).reads_gradients, accelerator)
    if engine == "deepspeed":  # the model is prepared without a loader: DeepSpeed is told the batch
        assert accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 16


def test_quantised_ddp_is_allowed():
    distributed.check(config.load(None, ["method.name=lora", "model.quantization=8bit"]), distributed.Launch("ddp", 2),
                      True, False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_fp16_on_cpu_is_refused_before_any_work(tmp_path):
    from peftbench.train import run

    with pytest.raises(PeftbenchError, match="train.mixed_precision=fp16 needs a GPU"):
        run(config.load(None, ["train.mixed_precision=fp16", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "record.json").exists()  # nothing ran: no failed record to rerun around


def test_best_state_snapshot_reads_and_writes_fsdp2_shards():
    """Under FSDP2 parameters are DTensors: the best-epoch snapshot copies this process's shard and writes it back."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from peftbench.distributed import local as _local

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        weight = torch.nn.Parameter(distribute_tensor(torch.arange(8.0).reshape(4, 2), init_device_mesh("cpu", (1,)),
                                                      [Shard(0)]))
        saved = _local(weight).detach().to("cpu", copy=True)
        with torch.no_grad():
            _local(weight).zero_()
            assert weight.full_tensor().abs().sum() == 0
            _local(weight).copy_(saved)
        assert torch.equal(weight.full_tensor(), torch.arange(8.0).reshape(4, 2))
        plain = torch.ones(3)
        assert _local(plain) is plain
    finally:
        dist.destroy_process_group()
