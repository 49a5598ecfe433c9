"""Launch sizes of the CUDA kernels: the one place they are chosen.

Every kernel loops with grid strides, so any launch size gives the same (bitwise) result
for a given launch configuration; these numbers only trade parallelism against the size
of the ``[splits, C]`` partial buffers. The simulator runs each thread as a Python thread
and each block one after another, so it gets tiny launches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchConfig:
    """Launch sizes.

    Attributes
    ----------
    threads_per_block : int
        Threads of the reduction and elementwise blocks; a power of two, and the length of
        the shared-memory arrays of the block merge.
    channel_tile : int
        Most channels one block covers on the channels-last paths (a power of two), so a
        warp reads consecutive channels of one row.
    blocks_per_sm : int
        Blocks per multiprocessor the reductions aim at when choosing their split count.
    max_splits : int
        Most partial results per channel (rows of the ``[splits, C]`` buffers).
    max_grid_blocks : int
        Most blocks of an elementwise launch; grid-stride loops cover the rest.
    per_channel_threads : int
        Threads per block of the small per-channel kernels.
    """

    threads_per_block: int = 256
    channel_tile: int = 32
    blocks_per_sm: int = 8
    max_splits: int = 256
    max_grid_blocks: int = 65535
    per_channel_threads: int = 128

    def __post_init__(self) -> None:
        for name in ("threads_per_block", "channel_tile"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.channel_tile > self.threads_per_block:
            raise ValueError("channel_tile must not exceed threads_per_block")


DEVICE = LaunchConfig()
SIMULATOR = LaunchConfig(
    threads_per_block=8,
    channel_tile=4,
    blocks_per_sm=4,
    max_splits=4,
    max_grid_blocks=4,
    per_channel_threads=8,
)


def _pow2_at_least(n: int, cap: int) -> int:
    """Smallest power of two >= n, capped at ``cap``."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class Launch:
    """Grid and block of one launch over an ``(outer, C, inner)`` array."""

    grid: tuple[int, int]
    block: tuple[int, int]


def reduction_launch(
    config: LaunchConfig, shape3: tuple[int, int, int], multiprocessors: int, channels_last: bool
) -> Launch:
    """Grid ``(channel tiles, splits)`` and block ``(bx, by)`` of a statistics reduction.

    Channels-first: one channel per block, ``bx`` threads along the contiguous inner axis
    and ``by`` rows of the outer axis. Channels-last: ``bx`` consecutive channels and
    ``by`` rows. Splits are chosen so that about ``blocks_per_sm`` blocks per
    multiprocessor run, never more than there are rows to give them.
    """
    outer, channels, inner = shape3
    threads = config.threads_per_block
    if channels_last:
        bx = _pow2_at_least(channels, config.channel_tile)
        tiles = math.ceil(channels / bx)
    else:
        bx = _pow2_at_least(inner, threads)
        tiles = channels
    by = threads // bx
    wanted = math.ceil(config.blocks_per_sm * multiprocessors / max(tiles, 1))
    splits = max(1, min(wanted, config.max_splits, math.ceil(outer / by), 65535))
    return Launch((max(tiles, 1), splits), (bx, by))


def elementwise_launch(
    config: LaunchConfig, shape3: tuple[int, int, int], channels_last: bool
) -> Launch:
    """Grid and block of an elementwise pass.

    Channels-first: grid ``(row blocks, 1)`` over the ``outer * C`` rows, ``bx`` threads
    along each contiguous row. Channels-last: grid ``(channel tiles, row blocks)``.
    """
    outer, channels, inner = shape3
    threads = config.threads_per_block
    if channels_last:
        bx = _pow2_at_least(channels, config.channel_tile)
        by = threads // bx
        tiles = math.ceil(channels / bx)
        rows = max(1, min(math.ceil(outer / by), config.max_grid_blocks // max(tiles, 1), 65535))
        return Launch((max(tiles, 1), rows), (bx, by))
    bx = _pow2_at_least(inner, threads)
    by = threads // bx
    rows = max(1, min(math.ceil(outer * channels / by), config.max_grid_blocks))
    return Launch((rows, 1), (bx, by))


def per_channel_launch(config: LaunchConfig, channels: int) -> tuple[int, int]:
    """``(blocks, threads)`` of a one-thread-per-channel kernel."""
    threads = config.per_channel_threads
    return max(1, math.ceil(channels / threads)), threads


def copy_launch(config: LaunchConfig, size: int) -> tuple[int, int]:
    """``(blocks, threads)`` of the strided copy."""
    threads = config.threads_per_block
    return max(1, min(math.ceil(size / threads), config.max_grid_blocks)), threads
