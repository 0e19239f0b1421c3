"""Batches from a flat token file: random training windows that a resumed run draws again exactly,
and a fixed, evenly spaced set of validation windows.

Training is indexed by micro-batch: item ``i`` of :class:`TrainBatches` is a whole micro-batch whose
window offsets come from a generator seeded by ``(seed, i, rank)`` alone. No state is carried from
one batch to the next, so starting the sampler at ``i`` (the resume point) reproduces the rest of
the run, with any number of DataLoader workers.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mqa_lm.data.store import TokenFile


def batch_seed(seed: int, index: int, rank: int) -> int:
    """A 64-bit generator seed mixed from (seed, micro-batch index, rank).

    Hashing rather than e.g. ``seed + index`` keeps neighbouring batches and ranks uncorrelated.
    """
    digest = hashlib.blake2b(f"{seed}/{index}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    buf = torch.from_numpy(rows)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class TrainBatches(Dataset):
    """Item ``i``: ``(x, y)`` int64 ``[batch_size, block_size]``, ``y`` = ``x`` shifted by one token,
    from ``batch_size`` windows at uniformly random offsets drawn with ``batch_seed(seed, i, rank)``.

    ``len`` is the epoch length in micro-batches (only used by samplers that need one, e.g.
    Lightning's ``overfit_batches``); any non-negative index is valid.
    """

    def __init__(
        self, tokens: TokenFile, block_size: int, batch_size: int, seed: int, rank: int = 0, length: int = 1
    ) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"{tokens.path} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.length = seed, rank, length

    def __len__(self) -> int:
        return self.length

    def offsets(self, index: int) -> torch.Tensor:
        """Start offsets of micro-batch ``index``'s windows."""
        generator = torch.Generator().manual_seed(batch_seed(self.seed, index, self.rank))
        return torch.randint(0, len(self.tokens) - self.block_size, (self.batch_size,), generator=generator)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _windows(self.tokens.array, self.offsets(int(index)).numpy(), self.block_size)


class ValWindows(Dataset):
    """``num_windows`` windows evenly spaced over the split (the same every time), sharded by rank.

    Rank ``r`` of ``world_size`` gets windows ``r, r + world_size, ...``; the list is padded by
    wrapping around so every rank gets the same count, as DistributedSampler does, which keeps
    collective ops in validation in lockstep.
    """

    def __init__(
        self, tokens: TokenFile, block_size: int, num_windows: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"{tokens.path} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        starts = np.linspace(0, len(tokens) - block_size - 1, num_windows).round().astype(np.int64)
        per_rank = -(-num_windows // world_size)
        padded = np.resize(starts, per_rank * world_size)
        self.tokens, self.block_size = tokens, block_size
        self.starts = padded[rank::world_size]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.tokens.array, self.starts[index : index + 1], self.block_size)
        return x[0], y[0]


class ResumeSampler(Sampler[int]):
    """Yields micro-batch indices from the resume point to the end of its epoch.

    Epochs are the aligned blocks ``[k * epoch_length, (k + 1) * epoch_length)``. ``start`` is asked
    at every ``iter()``, i.e. when Lightning starts (or resumes) an epoch, after it restored the
    checkpoint, so the indices continue exactly where the run left off and epoch boundaries fall
    where an uninterrupted run has them.
    """

    def __init__(self, epoch_length: int, start: Callable[[], int]) -> None:
        self.epoch_length = epoch_length
        self.start = start

    def __len__(self) -> int:
        return self.epoch_length

    def __iter__(self) -> Iterator[int]:
        start = self.start()
        return iter(range(start, (start // self.epoch_length + 1) * self.epoch_length))


class TrainLoader(DataLoader):
    """A DataLoader that declares itself resumable to Lightning (``state_dict``/``load_state_dict``).

    Its sampler already resumes from the trainer's step; the state only records that index, so a
    checkpoint from a run with a different ``accumulate_grad_batches`` (which would shift the
    batches) is reported instead of silently drawing different data. Without these methods
    Lightning warns on every mid-epoch resume that results may be unreliable, which here they are not.
    """

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumeSampler):
            return {}
        return {"next_micro_batch": self.sampler.start()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("next_micro_batch")
        if saved is None or not isinstance(self.sampler, ResumeSampler):
            return
        now = self.sampler.start()
        if saved != now:
            warnings.warn(
                f"the checkpoint's next training micro-batch is {saved} but this run resumes at {now} "
                "(global_step x accumulate_grad_batches); was accumulate_grad_batches changed? "
                "Batches will differ from the uninterrupted run.",
                stacklevel=2,
            )
