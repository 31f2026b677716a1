"""Data order: which samples each rank trains on, in which order, and where a resumed run picks up.

    loader = make_loader(dataset, collate_fn, args, runtime, epoch, skip_samples)

One seeded shuffle per epoch, the same on every rank, cut into optimizer steps; a resumed run
skips the samples it already trained on, even with another number of processes.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from model.command_line import UserError
from trainer.accelerator import loader_settings
from trainer.cli import LENGTH_GROUP_WINDOW
from trainer.loss_weighting import loss_terms
from trainer.processes import ignore_stop_signals, local_processes


@dataclass
class StepBatchSampler:
    """This rank's micro-batches (lists of sample indices) for one epoch.

    The epoch's order (see epoch_order) is the same on every rank. It is cut into optimizer
    steps of batch_size x accumulation_steps x world_size samples; inside a step, micro-batch j
    goes to rank j % world_size. So one process with accumulation 2 and two processes with
    accumulation 1 see the same micro-batches in every step, and a run can resume at any sample
    count, even with another number of ranks. The tail that does not fill a whole step is left
    out of this epoch (the next epoch's shuffle covers it). This takes the place of
    DistributedSampler: sharding by rank, reseeded every epoch like its set_epoch."""

    num_samples: int
    batch_size: int
    accumulation_steps: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    skip_samples: int = 0  # samples of this epoch already trained (resume)
    lengths: object = None  # a length per sample, for length grouping
    group_size: int = 0

    def __post_init__(self):
        if self.lengths is not None:
            self.lengths = torch.from_numpy(np.array(self.lengths, dtype=np.int64))

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.accumulation_steps * self.world_size

    @property
    def steps(self) -> int:
        """Optimizer steps left in this epoch."""
        return max(self.num_samples - self.skip_samples, 0) // self.samples_per_step

    def __len__(self) -> int:
        return self.steps * self.accumulation_steps

    def epoch_order(self) -> torch.Tensor:
        """A seeded shuffle; with lengths, also sorted by length inside consecutive windows of
        group_size samples, so the samples of one micro-batch have similar lengths and padding
        each batch to its longest sample wastes little. The windows depend on neither the batch
        size nor the world size, so a resumed run finds its place in the same order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        if self.lengths is not None and self.group_size > 1:
            for start in range(0, self.num_samples, self.group_size):
                window = order[start:start + self.group_size]
                order[start:start + self.group_size] = window[torch.argsort(self.lengths[window], stable=True)]
        return order

    def __iter__(self):
        order = self.epoch_order()[self.skip_samples:]
        for step in range(self.steps):
            for micro in range(self.accumulation_steps):
                start = step * self.samples_per_step + (micro * self.world_size + self.rank) * self.batch_size
                yield order[start:start + self.batch_size].tolist()


def sample_lengths(dataset):
    """A cheap length per sample for length grouping: the byte length of its jsonl line
    (the datasets of dataset/lm_dataset.py index their lines), or None when unknown."""
    lines = getattr(dataset, "lines", None)
    return lines.line_lengths() if hasattr(lines, "line_lengths") else None


def count_steps_per_epoch(num_samples: int, samples_per_step: int, data_path: str) -> int:
    steps = num_samples // samples_per_step
    if steps == 0:
        raise UserError(f"{data_path} has {num_samples} samples, fewer than one optimizer step takes "
                         f"(--batch_size x --accumulation_steps x processes = {samples_per_step}); "
                         f"lower --batch_size or --accumulation_steps")
    return steps


def count_real_tokens(items) -> int:
    """Non-padding tokens in a list of dataset items: (X, Y, mask) tuples or DPO dicts."""
    total = 0
    for item in items:
        if isinstance(item, dict):
            total += sum(len(v) for k, v in item.items() if k.startswith("x_"))
        else:
            total += len(item[0])
    return total


class CountingCollate:
    """Wraps a collate function and records how many real (non-padding) tokens the batch holds,
    how many positions the model computes (padding included) and how many terms its loss
    averages over (counted here, in the loader's workers, so the GPU never waits for it)."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, items):
        batch = self.collate_fn(items)
        batch["num_tokens"] = count_real_tokens(items)
        batch["num_positions"] = sum(batch[k].numel() for k in ("input_ids", "x_chosen", "x_rejected") if k in batch)
        batch["num_loss_terms"] = loss_terms(batch)
        return batch


def make_loader(dataset, collate_fn, args, runtime, epoch: int, skip_samples: int) -> DataLoader:
    """This rank's micro-batches of one epoch, from `skip_samples` samples into its order on
    (workers and pinned memory: accelerator.loader_settings)."""
    lengths = sample_lengths(dataset) if args.group_by_length else None
    sampler = StepBatchSampler(len(dataset), args.batch_size, args.accumulation_steps, runtime.rank,
                               runtime.world_size, args.seed, epoch, skip_samples,
                               lengths=lengths, group_size=LENGTH_GROUP_WINDOW)
    settings = loader_settings(runtime.device, args.num_workers, local_processes())
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=CountingCollate(collate_fn),
                      worker_init_fn=ignore_stop_signals if settings["num_workers"] else None, **settings)
