"""Deterministic sampling for the trainer: which groups a step reads on each process, and the seeds of each
group's random draws (VAE sample, prompt dropout, noise, timestep), so a resumed run continues the same sequence."""

from __future__ import annotations

import numpy as np
import torch


def group_seed(seed: int, epoch: int, index: int, purpose: int) -> int:
    entropy = [seed, epoch + 2**31, index, purpose]  # SeedSequence needs non-negative words
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)



class GroupBatchSampler:
    """Deterministic, sharded, endless batch sampler: epoch e is randperm(n, seed + e); global
    batch j is a contiguous slice of it and process r takes its part. Starts at `start` micro-steps."""

    def __init__(self, n: int, batch_size: int, num_replicas: int, rank: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.num_replicas, self.rank, self.seed, self.start = n, batch_size, num_replicas, rank, seed, start
        self.per_epoch = n // (batch_size * num_replicas)
        if self.per_epoch < 1:
            raise ValueError(
                f"the data set has {n} groups, fewer than one global batch ({batch_size} x {num_replicas} processes); "
                "lower train_batch_size or add data"
            )

    def __iter__(self):
        step = self.start
        while True:
            epoch, j = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            g = self.batch_size * self.num_replicas
            chunk = perm[j * g : (j + 1) * g]
            yield [(epoch, i) for i in chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]
            step += 1


class KeyedDataset(torch.utils.data.Dataset):
    """Reads item `index` for a key (epoch, index) and tags it with the key (see `_generators`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        # Random crops / flips of the data room's datasets depend on (seed, epoch, row): keep them in step.
        if hasattr(self.dataset, "set_epoch") and getattr(self.dataset, "epoch", None) != epoch:
            self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        item["group_key"] = (int(epoch), int(index))
        return item


def collate_keyed(items: list[dict]) -> dict:
    from diffalign.data import collate_groups

    batch = collate_groups(items)
    batch["group_keys"] = [item["group_key"] for item in items]
    return batch
