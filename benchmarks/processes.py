"""Running a function in several local processes of one gloo process group, and collecting what each returns
(the frame-parallel suite and the distributed tests)."""

from __future__ import annotations

import os
import socket
import traceback
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, queue, worker: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, worker(rank, *args)))
    except Exception:  # report, so that the parent fails with the cause
        queue.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable, *args, world: int = 2, timeout: float = 180) -> List[Tuple[int, object]]:
    """``worker(rank, *args)`` in ``world`` spawned processes of one gloo process group (a module-level function,
    its arguments and result picklable), one CPU thread each; returns (rank, result) sorted by rank, where a rank
    that raised gives its traceback as a string."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank_main, args=(rank, world, port, queue, worker, args))
                 for rank in range(world)]
    for process in processes:
        process.start()
    try:
        return sorted(queue.get(timeout=timeout) for _ in range(world))
    finally:
        for process in processes:
            process.join(timeout=30)
