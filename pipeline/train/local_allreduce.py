"""DeepSpeed's gradient all-reduce through its shared-memory kernel when every rank is on one CPU node.

gloo moves a CPU all-reduce through loopback TCP. DeepSpeed ships a shared-memory all-reduce
for CPUs (``deepspeed_shm_comm``, built at its first use; what its CPU inference uses). Measured
here on 2 ranks, one 4.8 MB bf16 tensor (the reference VAE's gradients): gloo 7.2 ms, shared
memory 1.0 ms; fp32 9.6 MB: 11.5 ms against 2.7 ms (median of 12, quiet machine).

DeepSpeed's training path never calls that kernel, so ``install`` routes its all-reduces to
it when they can take it: a CPU tensor of a dtype the kernel reduces (fp32 with AVX2; bf16 and
fp16 with AVX512-BW), a SUM over the whole world, blocking. Everything else (other groups,
MAX/MIN, integer tensors, async calls) goes to gloo as before: the kernel silently skips
dtypes it does not know, so the routing must never send it one. The kernel needs every rank on
one node (``LOCAL_SIZE`` = world size, read when DeepSpeed creates its backend).

``dist.shm_allreduce`` (on by default) takes it exactly there (CPU workers, one node, more
than one rank); false keeps gloo everywhere.

The kernel's workspace is one POSIX shared-memory segment of ~66 MiB per rank, in /dev/shm,
which DeepSpeed never removes: a small /dev/shm (a container's 64 MiB default) cannot hold it,
and every run would leave its segments behind. So ``prepare`` takes the kernel only when
/dev/shm has room on every rank (the ranks agree, or one would wait forever on the other's
segment), and ``install`` unlinks each rank's segment once all ranks have mapped it: the
mappings stay valid until the process ends, and nothing is left in /dev/shm after it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from pipeline.train import timers

_LEVEL_NEEDED = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}
SHM_DIR = "/dev/shm"
# DeepSpeed's allreduce_workspace (csrc/cpu/comm/shm.cpp): 2 x 1 MiB + 2 x 32 MiB of buffers,
# plus its state flags; rounded up, and a margin for what else lives in /dev/shm (Ray, semaphores).
SEGMENT_BYTES = 67 * 2**20
MARGIN_BYTES = 64 * 2**20


def wanted(enabled: bool, use_cuda: bool, world: int, local_world: int) -> bool:
    return enabled and not use_cuda and world > 1 and local_world == world


def shm_room(world: int, shm_dir: str = SHM_DIR) -> bool:
    """Whether ``shm_dir`` can hold every local rank's workspace segment, with a margin."""
    import shutil

    try:
        free = shutil.disk_usage(shm_dir).free
    except OSError:
        return False
    return free >= world * SEGMENT_BYTES + MARGIN_BYTES


def prepare(world: int) -> bool:
    """Before DeepSpeed creates its comm backend: tell its shm kernel all ranks are local, if
    /dev/shm has room on every rank (decided together over the process group). False: gloo."""
    import torch.distributed as dist

    room = torch.tensor([1 if shm_room(world) else 0])
    dist.all_reduce(room, op=dist.ReduceOp.MIN)
    if not int(room):
        import warnings

        warnings.warn(f"dist.shm_allreduce: {SHM_DIR} lacks {world} x {SEGMENT_BYTES >> 20} MiB for the "
                      "shared-memory all-reduce on some rank; all-reduces stay on gloo")
        return False
    os.environ["LOCAL_SIZE"] = str(world)
    return True


def segment_path(rank: int) -> str:
    """The file of this rank's workspace segment, named as DeepSpeed's shm_initialize names it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def release_segment() -> None:
    """Once every rank has mapped every segment (the barrier), unlink this rank's name: the
    memory stays mapped while the ranks live and goes with them, so no run leaves 66 MiB behind."""
    import torch.distributed as dist

    dist.barrier()
    try:
        os.unlink(segment_path(dist.get_rank()))
    except FileNotFoundError:
        pass


def install() -> bool:
    """Route DeepSpeed's eligible all-reduces to the shm kernel; False if it is not there."""
    from deepspeed.comm import comm

    cdb = comm.cdb
    release_segment()
    level = getattr(cdb, "shm_vector_kernel_level", 0)
    if cdb is None or not level or not hasattr(torch.ops, "deepspeed") or getattr(cdb, "_vaepipe_shm", False):
        return bool(getattr(cdb, "_vaepipe_shm", False))
    gloo_all_reduce = cdb.all_reduce
    world = torch.distributed.get_world_size()

    def all_reduce(tensor, op=comm.ReduceOp.SUM, group=None, async_op=False):
        if eligible(tensor, op, group, async_op, level, world):
            t0 = time.perf_counter()
            torch.ops.deepspeed.inference_all_reduce_(tensor)
            timers.record_comm(time.perf_counter() - t0)
            return None
        return gloo_all_reduce(tensor, op, group, async_op)

    cdb.all_reduce, cdb._vaepipe_shm = all_reduce, True
    return True


def eligible(tensor: Any, op: Any, group: Any, async_op: bool, level: int, world: int) -> bool:
    from deepspeed.comm import comm

    return (isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" and tensor.is_contiguous()
            and level >= _LEVEL_NEEDED.get(tensor.dtype, 99) and not async_op
            and op in (comm.ReduceOp.SUM, torch.distributed.ReduceOp.SUM)
            and (group is None or torch.distributed.get_world_size(group=group) == world))
