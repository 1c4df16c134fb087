"""Distributed data-parallel plumbing for torchrun: one process per device, gloo on CPU, nccl on CUDA.

    torchrun --standalone --nproc_per_node=2 -m nin train --dataset mnist --epochs 1

Reads RANK, LOCAL_RANK and WORLD_SIZE as torchrun sets them; without them everything is a no-op
for a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["setup", "cleanup", "process_group", "launched_by_torchrun", "launch_rank", "is_distributed", "rank", "world_size", "is_main", "main_first",
           "all_reduce_sum", "all_true", "broadcast_object", "broadcast_buffers", "barrier", "lost_peer"]


def setup(device: torch.device | None = None) -> torch.device:
    """Join the process group when launched by torchrun; return the device this rank uses."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1 or dist.is_initialized():
        return device if device is not None else _default_device()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = _default_device()
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return device


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


# What gloo (or the rendezvous store) says when the process at the other end of a connection has gone: it stopped
# on an error, was killed, or its machine dropped off the network. A collective this process was in, or entered
# after, raises a RuntimeError with one of these.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


def lost_peer(error: BaseException) -> str | None:
    """The one line to print when ``error`` is a collective failing under torchrun, else None.

    When one process of a launch stops, the others fail in their next collective: gloo raises a RuntimeError with
    a C++ source path and "Connection closed by peer". That is said as "rank R of W: lost its connection to
    another process of this run ...", not as a traceback per rank; the rendezvous store failing
    (torch.distributed's DistStoreError, DistNetworkError) as "rank R of W: the process group failed: ...". Any
    other error, a backend's included (NCCL's DistBackendError can be a bug of ours), keeps its traceback.
    """
    if not launched_by_torchrun() or not isinstance(error, RuntimeError):
        return None
    text = " ".join(str(error).split())
    where = f"rank {launch_rank()} of {os.environ['WORLD_SIZE']}"
    gone = next((phrase for phrase in _PEER_GONE if phrase in text.lower()), None)
    if gone is not None:
        return (f"{where}: lost its connection to another process of this run ({gone}), so it stops too: that "
                "process stopped on its own error, was killed, or its machine is unreachable (torchrun's summary "
                "says which)")
    if isinstance(error, (dist.DistStoreError, dist.DistNetworkError)):
        return f"{where}: the process group failed: {text}"
    return None


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 in a single process), readable before the group is joined.

    For messages printed once per launch before `setup`; inside the group, `rank()` says the same.
    """
    return int(os.environ.get("RANK", "0") or 0)


@contextlib.contextmanager
def process_group(device: torch.device | None = None) -> Iterator[torch.device]:
    """Join the process group for the body (under torchrun) and leave it after; yields this rank's device.

        with process_group(resolve_device(args.device)) as device:
            train(cfg, out, device=device)

    In a single process it only yields the device. A group joined before the call is left as it was.
    """
    joined = launched_by_torchrun() and not dist.is_initialized()
    device = setup(device)
    try:
        yield device
    finally:
        if joined:
            cleanup()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (a download, say); the others wait, then run it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; returns it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_true(flag: bool | torch.Tensor, device: torch.device | None = None) -> bool:
    """True when ``flag`` holds on every rank, so that all ranks take the same branch (raise, stop, step).

    A tensor flag stays on its device for the reduction (nccl needs CUDA tensors); a bool travels on ``device``.
    """
    if isinstance(flag, torch.Tensor):
        value = flag.detach().reshape(()).to(torch.int32)
    else:
        value = torch.tensor(int(bool(flag)), dtype=torch.int32, device=device or _collective_device())
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def _collective_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank, in place.

    Under DDP the parameters stay identical on all ranks but each rank updates its running statistics
    from its own batches; evaluating after this uses the statistics rank 0 saves in its checkpoints.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        if buffer.is_contiguous():
            dist.broadcast(buffer, src=0)
        else:
            dense = buffer.contiguous()
            dist.broadcast(dense, src=0)
            buffer.copy_(dense)


def broadcast_object(obj: object) -> object:
    """Rank 0's object on every rank (between our own processes only; never used on file contents)."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
