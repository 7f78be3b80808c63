"""DeepSpeed config generation and the precision choice, decided in one place."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.engine import DeviceFacts, build_deepspeed_config, cpu_has_fast_bf16, resolve_precision


@pytest.mark.parametrize(
    "facts, expected",
    [
        (DeviceFacts(cuda=False, cpu_fast_bf16=False), "fp32"),  # this CI machine: AVX512-BF16 only
        (DeviceFacts(cuda=False, cpu_fast_bf16=True), "bf16"),  # AMX CPU
        (DeviceFacts(cuda=True, cuda_capability=(8, 0)), "bf16"),  # A100/H100
        (DeviceFacts(cuda=True, cuda_capability=(7, 0)), "fp16"),  # V100: fp16 + loss scaling
    ],
)
def test_auto_precision(facts, expected):
    assert resolve_precision("auto", facts) == expected


def test_explicit_precision_wins_and_fp16_needs_cuda():
    assert resolve_precision("bf16", DeviceFacts(cuda=False)) == "bf16"
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", DeviceFacts(cuda=False))


def test_cpu_fast_bf16_needs_amx(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu avx2 avx512f avx512_bf16\n")
    assert not cpu_has_fast_bf16(info)
    info.write_text("flags\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_has_fast_bf16(info)
    assert not cpu_has_fast_bf16(tmp_path / "missing")


def test_deepspeed_config_reflects_the_typed_config():
    cfg = load_config(None, ["data.batch_size=16", "train.grad_accum_steps=4", "dist.zero_stage=3",
                             "dist.offload_optimizer=true", "dist.offload_params=true", "optim.grad_clip=2.5",
                             "optim.name=adamw", "optim.lr=3e-4"])
    ds = build_deepspeed_config(cfg, world_size=2, precision="bf16")
    assert ds["train_batch_size"] == 16 * 4 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 2.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds


def test_fp32_has_no_mixed_precision_sections_and_fp16_has_dynamic_scaling():
    cfg = load_config(None, ["dist.zero_stage=1"])
    fp32 = build_deepspeed_config(cfg, 1, "fp32")
    assert "bf16" not in fp32 and "fp16" not in fp32
    assert "offload_optimizer" not in fp32["zero_optimization"]
    fp16 = build_deepspeed_config(cfg, 1, "fp16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic


def test_fused_adam_is_passed_to_torch_and_can_be_turned_off():
    from pipeline.config import load_config
    from pipeline.train.engine import build_deepspeed_config

    assert build_deepspeed_config(load_config(None, []), 2, "bf16")["optimizer"]["params"]["fused"] is True
    off = build_deepspeed_config(load_config(None, ["optim.fused=false"]), 2, "bf16")
    assert off["optimizer"]["params"]["fused"] is False


@pytest.mark.parametrize("stage,world,summed", [(0, 2, True), (2, 2, True), (3, 2, False), (2, 1, False)])
def test_the_loops_engines_sum_gradients_where_deepspeed_can(stage, world, summed):
    cfg = load_config(None, [f"dist.zero_stage={stage}"])
    loop = build_deepspeed_config(cfg, world, "fp32", sum_gradients=True)
    assert (loop.get("gradient_allreduce_op") == "sum") is summed  # ZeRO-3 has no sum mode; one rank needs none
    assert "gradient_allreduce_op" not in build_deepspeed_config(cfg, world, "fp32")  # others keep the mean


def test_zero_1_2_gradient_bucket_is_no_larger_than_the_trainable_parameters():
    from pipeline.train.engine import DEEPSPEED_REDUCE_BUCKET, size_reduce_bucket

    params = [torch.nn.Parameter(torch.zeros(300, 10)), torch.nn.Parameter(torch.zeros(7))]
    for stage in (1, 2):
        ds = build_deepspeed_config(load_config(None, [f"dist.zero_stage={stage}"]), 2, "bf16")
        sized = size_reduce_bucket(ds, params)
        assert sized["zero_optimization"]["reduce_bucket_size"] == 3007
        assert "reduce_bucket_size" not in ds["zero_optimization"]  # the caller's dict is not changed
    huge = [torch.empty(1).expand(DEEPSPEED_REDUCE_BUCKET + 1)]  # that many elements, one in memory
    ds2 = build_deepspeed_config(load_config(None, ["dist.zero_stage=2"]), 2, "bf16")
    assert size_reduce_bucket(ds2, huge)["zero_optimization"]["reduce_bucket_size"] == DEEPSPEED_REDUCE_BUCKET
    for stage in (0, 3):
        ds = build_deepspeed_config(load_config(None, [f"dist.zero_stage={stage}"]), 2, "bf16")
        assert size_reduce_bucket(ds, params) == ds
    explicit = {**ds2, "zero_optimization": {**ds2["zero_optimization"], "reduce_bucket_size": 10**6}}
    assert size_reduce_bucket(explicit, params) == explicit
