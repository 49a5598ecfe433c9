"""Launch sizes and kernel arguments of the CuPy backend: the one place they are chosen.

Pure Python (no CuPy), so the tests check them on any machine. The layout of a block and the
meaning of ``channels_per_block`` and ``chunk`` are described at the top of ``kernels.cu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Threads of every block; a power of two (the shared-memory tree of the reductions).
BLOCK_THREADS = 256
#: Positions a thread loads before using them: loads in flight per thread.
UNROLL = 4
#: Most channels one block covers on the channels-last path: one warp reads 32 channels.
MAX_CHANNELS_PER_BLOCK = 32
#: Blocks per multiprocessor a launch aims at (2048 resident threads at 256 per block).
BLOCKS_PER_SM = 8
#: Fewest positions a thread should visit before a split is worth its partial result.
MIN_POSITIONS_PER_THREAD = 4 * UNROLL
#: Most splits of a reduction: the finishing kernel merges them serially per channel.
MAX_SPLITS = 1024
#: Largest grid.y (a CUDA limit); kernels loop over the remaining channel tiles.
MAX_GRID_Y = 65535
#: Threads per block of the per-channel finishing kernels.
FINISH_THREADS = 128

#: C++ type of the kernels' template argument for each data type.
CTYPES = {
    np.dtype(np.float16): "half_bits",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
#: Kernels templated on the data type, and the per-channel kernels (one thread per channel,
#: :data:`FINISH_THREADS` a block), templated on the accumulation type.
DATA_KERNELS = ("channel_stats_partial", "grad_sums_partial", "normalize", "input_grad")
ACC_KERNELS = (
    "channel_stats_finish",
    "grad_sums_finish",
    "eval_stats",
    "update_running_stats",
    "param_grads",
)


def accumulation_dtype(dtype) -> np.dtype:
    """float64 for float64 data, float32 for float16 and float32 data."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def compile_options() -> tuple[str, ...]:
    """Preprocessor and language options every compile of ``kernels.cu`` uses."""
    return ("-std=c++17", f"-DBN_BLOCK_THREADS={BLOCK_THREADS}", f"-DBN_UNROLL={UNROLL}")


def kernel_name(kernel: str, dtype) -> str:
    """Name expression of a kernel instantiated for data of ``dtype``.

    Examples
    --------
    >>> kernel_name("normalize", "float16")
    'normalize<half_bits>'
    >>> kernel_name("grad_sums_finish", "float16")
    'grad_sums_finish<float>'
    """
    dtype = np.dtype(dtype)
    if kernel in ACC_KERNELS:
        dtype = accumulation_dtype(dtype)
    elif kernel not in DATA_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    return f"{kernel}<{CTYPES[dtype]}>"


def name_expressions(dtype) -> list[str]:
    """Every kernel instantiation the module for data of ``dtype`` contains."""
    return [kernel_name(k, dtype) for k in DATA_KERNELS + ACC_KERNELS]


def element_strides(byte_strides, itemsize: int) -> tuple[int, ...]:
    """Strides in elements (what the kernels take) from NumPy/CuPy byte strides.

    Examples
    --------
    >>> element_strides((-24, 8, 4), 4)
    (-6, 2, 1)
    """
    strides = tuple(int(s) for s in byte_strides)
    if any(s % itemsize for s in strides):
        raise ValueError(f"strides {strides} are not multiples of the item size {itemsize}")
    return tuple(s // itemsize for s in strides)


def is_channels_last(shape3, strides3) -> bool:
    """Whether threads should run along channels: the channel axis is the fastest varying."""
    _, channels, inner = shape3
    return inner == 1 or (channels > 1 and abs(strides3[1]) < abs(strides3[2]))


@dataclass(frozen=True)
class Launch:
    """One launch over an ``(outer, C, inner)`` view.

    Attributes
    ----------
    grid : tuple of int
        ``(splits, channel tiles)``.
    channels_per_block : int
        Channel slots of a block (a power of two dividing :data:`BLOCK_THREADS`).
    chunk : int
        Positions of the ``(outer, inner)`` plane per split; split ``s`` covers
        ``[s * chunk, min((s + 1) * chunk, outer * inner))``, never empty.
    """

    grid: tuple[int, int]
    channels_per_block: int
    chunk: int

    @property
    def block(self) -> tuple[int]:
        return (BLOCK_THREADS,)

    @property
    def splits(self) -> int:
        return self.grid[0]


def plan_launch(
    shape3, channels_last: bool, multiprocessors: int, max_splits: int = MAX_SPLITS
) -> Launch:
    """Grid, channel slots and split size of a reduction or elementwise pass.

    Aims at :data:`BLOCKS_PER_SM` blocks per multiprocessor, splitting the plane no finer
    than :data:`MIN_POSITIONS_PER_THREAD` positions per thread. Requires ``C >= 1``.

    Examples
    --------
    >>> plan_launch((32, 64, 3136), channels_last=False, multiprocessors=132)
    Launch(grid=(17, 64), channels_per_block=1, chunk=6144)
    """
    outer, channels, inner = (int(n) for n in shape3)
    if channels < 1:
        raise ValueError("a launch needs at least one channel")
    slots = min(MAX_CHANNELS_PER_BLOCK, 1 << (channels - 1).bit_length()) if channels_last else 1
    lanes = BLOCK_THREADS // slots
    tiles = math.ceil(channels / slots)
    grid_y = min(tiles, MAX_GRID_Y)
    plane = outer * inner
    wanted = math.ceil(BLOCKS_PER_SM * multiprocessors / grid_y)
    useful = math.ceil(plane / (lanes * MIN_POSITIONS_PER_THREAD))
    splits = max(1, min(wanted, useful, max_splits))
    # Whole multiples of the lane count keep every split's first position equally aligned.
    chunk = math.ceil(math.ceil(plane / splits) / lanes) * lanes
    splits = max(1, math.ceil(plane / chunk)) if plane else 1
    return Launch((splits, grid_y), slots, chunk)


def finish_grid(channels: int) -> tuple[int]:
    """Blocks of a one-thread-per-channel finishing kernel (``FINISH_THREADS`` each)."""
    return (max(1, math.ceil(channels / FINISH_THREADS)),)
