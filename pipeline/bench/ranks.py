"""Run a function on N fresh processes joined by a gloo process group on 127.0.0.1 (no Ray).

A benchmark that reads a process's *peak* memory needs a process that did nothing else before:
``ru_maxrss`` only ever grows. Each call here spawns new processes, so every configuration a
benchmark measures starts from the same clean slate. Results come back pickled through a queue;
an exception on any rank is raised here with that rank's traceback.

``start_method="forkserver"`` forks the ranks from multiprocessing's fork server instead: with
``multiprocessing.set_forkserver_preload`` it has imported torch and DeepSpeed once, so a rank
starts in ~0.1 s instead of ~5 s of imports (the tests' choice; a benchmark keeps "spawn"). The
server was started with the environment of its first use, so each rank is handed the caller's.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable


class RankFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue, threads: int, backend: str | None,
           dump_after: float, env: dict) -> None:
    import faulthandler

    os.environ.clear()
    os.environ.update(env)
    faulthandler.dump_traceback_later(dump_after, exit=False)  # a rank that hangs says where, before it is killed
    import torch
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)})
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "gloo":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world)
        queue.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # reported to the parent, which raises
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _next_result(queue, procs, deadline: float):
    """The next rank's report; fails fast when a process died without one (e.g. killed, or it
    could not start) instead of waiting out the whole timeout."""
    import queue as queue_mod

    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=2.0)
        except queue_mod.Empty:
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                try:
                    return queue.get(timeout=2.0)  # its traceback may still be on the way
                except queue_mod.Empty:
                    raise RankFailed(f"rank(s) exited without a result (rank, exit code): {dead}") from None
    raise RankFailed("no result from every rank before the timeout")


def run_fresh_ranks(fn: Callable[..., Any], world: int, args: tuple = (), timeout: float = 600.0,
                    threads: int = 1, backend: str | None = None, start_method: str = "spawn") -> list:
    """``fn(rank, world, *args)`` on ``world`` new processes; returns the results in rank order.
    ``backend``: nccl on a CUDA machine, else gloo (tests of the CPU path force gloo)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = _free_port()
    dump_after = max(1.0, timeout - 15.0)
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, threads, backend, dump_after, dict(os.environ)))
             for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world:
            rank, status, value = _next_result(queue, procs, deadline)
            if status == "error":
                raise RankFailed(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
