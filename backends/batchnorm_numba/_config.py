"""Tile sizes and thresholds of the ``numba`` backend: the one place they live.

They fix how the work is cut into tiles, so they (and the shape, never the thread count)
decide the order of floating-point operations: changing one changes results in the last bits.
Measured on a 2-core AMD EPYC (Zen 3: 32 KiB L1d, 512 KiB L2 per core).
"""

#: Elements per tile (channels-first: rows of one channel; channels-last: a block of rows).
#: 8192 float32 values are 32 KiB: the two passes over a tile (sum, then squared
#: deviations from the tile mean) read the second time from L1/L2.
TILE_ELEMENTS = 8192

#: Channels-last: columns per tile, so a tile's float64 partial rows stay in L1.
COLUMN_BLOCK = 1024

#: Channels-last: rows per tile at least this many, so the partial rows (16 bytes per column
#: and row block) stay small next to the input, and fewer of them are zeroed and merged.
#: Matters for C > 128: on (256, 1024), 64 rows (256 KiB tiles, the second pass from L2)
#: made forward-train 1.14x and backward 1.15x faster than 16 rows; on (3136, 512), 1.36x
#: and 1.2x.
MIN_ROWS_PER_TILE = 64

#: Inputs with fewer elements than this run single-threaded: below it a parallel launch
#: costs more than it saves.
SERIAL_ELEMENTS = 1 << 15

#: Channels-first fused passes keep one channel per task while a channel's data (x, or dy
#: and x) is at most this many bytes, so the second read comes from cache (L2, and the L3
#: it spills to) instead of memory. Measured on (32, 64, 56, 56): forward-train 1.9x
#: faster with a 401 KiB channel resident than with tiles merged across tasks.
RESIDENT_BYTES = 1 << 20

#: ... and while there are at least this many channels to share among the threads.
RESIDENT_MIN_CHANNELS = 16
