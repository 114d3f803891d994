"""Deterministic, resumable batches: each rank reads its own shard of a per-epoch permutation.

The permutation of epoch e is drawn from a generator seeded with (seed, e), independent of the training RNG,
so `state_dict()` = (epoch, position) is all that a checkpoint needs to continue with the very next batch.
"""
from __future__ import annotations

import torch


class ShardedBatches:
    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        n = len(dataset)
        if n // world_size < batch_size:
            raise ValueError(f"dataset: {n} items cannot give each of {world_size} rank(s) a batch of {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = dataset, batch_size, rank, world_size, seed
        self.epoch, self.position = 0, 0
        self._order = None

    def _shard(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(len(self.dataset), generator=g).tolist()
            self._order = (self.epoch, perm[self.rank::self.world_size])
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        shard = self._shard()
        if (self.position + 1) * self.batch_size > len(shard):
            self.epoch, self.position = self.epoch + 1, 0
            shard = self._shard()
        idx = shard[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        items = [self.dataset[i] for i in idx]
        return {"video": torch.stack([it["video"] for it in items]), "caption": [it["caption"] for it in items]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None
