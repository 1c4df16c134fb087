"""Batches from tensors already in memory: shuffled, sharded over ranks, augmented per batch.

Every rank computes the same permutation from (seed, epoch) and takes every world_size-th index, so no
sampler state crosses processes; augmentation draws come from a generator seeded by (seed, epoch, rank, batch).

    loader = TensorLoader(images, labels, batch_size=128, seed=0, augment=Augment(translate=4))
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

SEED_STRIDE = 1_000_003  # a prime; seed * stride + epoch keeps (seed, epoch) pairs apart for any realistic epoch count
SEED_MODULUS = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch, the same on every rank."""
    return (seed * SEED_STRIDE + epoch) % SEED_MODULUS


def batch_seed(seed: int, epoch: int, rank: int, batch_index: int) -> int:
    """The augmentation seed of one batch: independent of worker count, and of where a resumed run starts."""
    return ((epoch_seed(seed, epoch) * SEED_STRIDE + rank) * SEED_STRIDE + batch_index) % SEED_MODULUS


def shard_indices(
    size: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int
) -> torch.Tensor:
    """The indices one rank visits in one epoch (CPU int64).

    Training (shuffle=True): a randperm from a generator seeded by (seed, epoch); rank r takes perm[r::world_size],
    trimmed to size // world_size so all ranks run equal steps. Evaluation (shuffle=False): rank r takes
    r::world_size with no padding or trimming, so every image is counted exactly once across ranks.
    """
    assert 0 <= rank < world_size, f"rank {rank} outside world_size {world_size}"
    if not shuffle:
        return torch.arange(rank, size, world_size)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    permutation = torch.randperm(size, generator=generator)
    return permutation[rank::world_size][: size // world_size]


def _split_batches(indices: torch.Tensor, batch_size: int, drop_last: bool) -> list[torch.Tensor]:
    batches = list(indices.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class TensorLoader:
    """Shuffled, sharded, augmented batches of a tensor data set that lives whole on one device."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: Augmentation | None = None,
    ) -> None:
        """Args:
        images: The preprocessed split (N, C, H, W), any dtype and device; kept whole, never copied.
        labels: (N,) int64 on the same device.
        batch_size: Images per batch on this rank.
        shuffle: A new permutation every epoch (training); False keeps file order (evaluation).
        seed: Base seed of the permutations and augmentation draws.
        drop_last: Drop this rank's last, incomplete batch.
        rank: This process's rank.
        world_size: Number of processes.
        augment: Called as augment(batch, generator) on every batch.
        """
        assert len(images) == len(labels), f"{len(images)} images but {len(labels)} labels"
        assert batch_size > 0, f"batch_size must be positive, got {batch_size}"
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size, self.augment = rank, world_size, augment
        self.epoch = 0
        self.start_batch = 0  # set by skip(); consumed by the next __iter__

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next iteration uses."""
        self.epoch = epoch

    def skip(self, num_batches: int) -> None:
        """Make the next iteration start at batch `num_batches` of the current epoch (resuming mid-epoch)."""
        assert 0 <= num_batches <= len(self), f"cannot skip {num_batches} of {len(self)} batches"
        self.start_batch = num_batches

    def _indices(self) -> torch.Tensor:
        return shard_indices(
            len(self.labels), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
            world_size=self.world_size,
        )  # fmt: skip

    def __len__(self) -> int:
        count = len(self._indices()) if not self.shuffle else len(self.labels) // self.world_size
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self._indices().to(self.images.device)
        start, self.start_batch = self.start_batch, 0
        for batch_index, batch in enumerate(_split_batches(indices, self.batch_size, self.drop_last)):
            if batch_index < start:
                continue
            images, labels = self.images.index_select(0, batch), self.labels.index_select(0, batch)
            if self.augment is not None:
                generator = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, self.rank, batch_index))
                images = self.augment(images, generator)
            yield images, labels
