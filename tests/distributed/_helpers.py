"""`run_on_ranks`: run a function on N CPU processes joined by a real gloo process group.

Each rank gets MASTER_ADDR=127.0.0.1 + a free port, RANK / WORLD_SIZE / LOCAL_RANK in its env, one
intra-op thread, and `init_process_group("gloo")`; its return value is written to
`tmp_path/rank-<r>.pt` (tensors, numbers, strings, lists, dicts) and the group is destroyed in `finally`.
The parent gets the list of results in rank order and does the asserting.

A rank that finished leaves with `os._exit(0)` once its result is on disk and its group destroyed: about
one run in ten of a DeepSpeed gloo rank otherwise aborted in C++ static destructors after Python had
finalized ("terminate called without an active exception", SIGABRT, no Python frame), which is teardown
noise after the work under test is done, not a result.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, tmp_path: str, timeout: float, kwargs: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)  # N ranks share a few cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, Path(tmp_path), **kwargs)
        torch.save(result, Path(tmp_path) / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see the module docstring: skip exit-time C++ destructors once the result is saved


def run_on_ranks(
    fn: Callable[..., Any], world_size: int = 2, tmp_path: Path | str | None = None, timeout: float = 120, **kwargs: Any
) -> list[Any]:
    """Run `fn(rank, world_size, tmp_path, **kwargs)` on `world_size` spawned processes; return their results.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of processes.
        tmp_path: shared scratch directory (pytest's `tmp_path`).
        timeout: seconds before the processes are killed and the call fails.
        kwargs: picklable keyword arguments for `fn`.

    Raises:
        TimeoutError: a rank did not finish in time.
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback is in the message).
    """
    if tmp_path is None:
        raise ValueError("run_on_ranks needs tmp_path")
    tmp_path = Path(tmp_path)
    for old in tmp_path.glob("rank-*.pt"):
        old.unlink()
    ctx = mp.start_processes(
        _worker,
        args=(fn, world_size, free_port(), str(tmp_path), timeout, kwargs),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"run_on_ranks({getattr(fn, '__name__', fn)}) timed out after {timeout} s")
    return [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(world_size)]
