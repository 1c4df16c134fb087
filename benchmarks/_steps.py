"""The timed loop the training-step benchmarks share: warm-up steps, then timed `nin.engine.train_step` calls."""

from __future__ import annotations

import time

import torch

from nin.engine import train_step


def seconds_for_steps(model, optimizer, images: torch.Tensor, labels: torch.Tensor, *, cfg, amp_dtype,
                      steps: int, warmup: int = 2, sync=lambda: None,
                      memory_format: torch.memory_format = torch.channels_last) -> float:
    """Wall seconds for ``steps`` training steps on one batch, after ``warmup`` untimed ones; ``sync`` runs
    before the clock starts and stops (a DDP barrier, say)."""
    def step():
        train_step(model, optimizer, images, labels, lr=0.01, cfg=cfg, amp_dtype=amp_dtype, memory_format=memory_format)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start
