"""Two processes × one thread (gloo DDP on one machine) against one process × two threads, in one run.

    python benchmarks/procs_threads.py               # fast-recipe nin_cifar10, global batch 128, 32 px

The lever: on a 2-core CPU, one process with two threads splits every convolution across the cores and
synchronises at each operator; two DDP processes with one thread each run whole steps independently and
meet once per step to all-reduce the gradients (gloo, shared memory). Both sides take `nin.engine.train_step`
steps on the fast recipe's nin_cifar10 (batch norm, bf16 autocast where the CPU has it, channels_last) with
random images, at the same global batch: 128 on one process, 64 on each of two. It prints images/s and the
ratio against one process × two threads, which is timed again at the end to show the drift of a shared host.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nin.engine import recipe
from nin.models import get_model
from nin.runtime import keep_freed_memory, select_precision
from nin.engine import make_optimizer

from _steps import seconds_for_steps


def _timed_steps(batch: int, size: int, steps: int, ddp: bool) -> float:
    """Seconds for ``steps`` training steps after 2 warm-up steps."""
    cfg = recipe("fast", "cifar10")
    amp_dtype = select_precision(cfg.precision, torch.device("cpu"))
    torch.manual_seed(0)
    model: nn.Module = get_model("nin_cifar10", **cfg.model_args).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    return seconds_for_steps(model, optimizer, images, labels, cfg=cfg, amp_dtype=amp_dtype, steps=steps,
                             sync=dist.barrier if ddp else lambda: None)


def _rank(rank: int, world: int, port: int, batch: int, size: int, steps: int, result) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seconds = _timed_steps(batch // world, size, steps, ddp=True)
        if rank == 0:
            result.put(seconds)
    finally:
        dist.destroy_process_group()


def _two_processes(batch: int, size: int, steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(2, port, batch, size, steps, result), nprocs=2, start_method="spawn")
    return result.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    images = args.batch * args.steps
    base = images / _timed_steps(args.batch, args.size, args.steps, ddp=False)
    print(f"1 process × 2 threads, batch {args.batch}:       {base:6.0f} img/s  1.00×", flush=True)
    speed = images / _two_processes(args.batch, args.size, args.steps)
    print(f"2 processes × 1 thread, batch {args.batch // 2} each: {speed:6.0f} img/s  {speed / base:.2f}×", flush=True)
    again = images / _timed_steps(args.batch, args.size, args.steps, ddp=False)
    print(f"1 process × 2 threads, again:          {again:6.0f} img/s  {again / base:.2f}×", flush=True)


if __name__ == "__main__":
    main()
