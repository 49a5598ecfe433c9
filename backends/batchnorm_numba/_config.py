"""Tile sizes and thresholds of the ``numba`` backend: the one place they live.

They fix how the work is cut into tiles, so they (and the shape, never the thread count)
decide the order of floating-point operations: changing one changes results in the last bits.
Measured on a 2-core AMD EPYC (Zen 3: 32 KiB L1d, 512 KiB L2 per core). One threshold lives
in ``_kernels.py`` instead, ``PERIODIC_COLUMNS``: the kernels read it as a constant when
they compile, and Numba's cache would not see it change here.
"""

#: Channels-first: elements per tile (rows of one channel, or a piece of a long row).
#: 8192 float32 values are 32 KiB: the two passes over a tile (sum, then squared
#: deviations from the tile mean) read the second time from L1/L2.
TILE_ELEMENTS = 8192

#: Channels-last: values per tile (a block of whole rows, or of COLUMN_BLOCK columns), at
#: least MIN_ROWS_PER_TILE rows. 32768 float32 values are 128 KiB: a tile and the next one,
#: prefetched, share L2 with room, and there are fewer partial rows to merge and fewer ends
#: of streamed runs than with TILE_ELEMENTS. Measured while the statistics still read each
#: tile twice (the second time from L2); against 8192, on 2
#: threads, float32: (100352, 64) forward-train 1.28x, forward-eval 1.13x, backward 1.21x
#: faster; (50176, 128) 1.08x, 1.22x, 1.12x; (401408, 16) 1.08x, 1.14x, 1.07x; C >= 1024
#: unchanged (MIN_ROWS_PER_TILE rules); (100000, 3) 0.98x (noise is about 3%). 65536 was no
#: better.
COLUMN_TILE_ELEMENTS = 32768

#: Channels-last: columns per tile of the reductions, so a tile's float64 partial rows stay in
#: L1 (the elementwise passes keep rows whole: ``_kernels.elementwise_tiling``).
COLUMN_BLOCK = 1024

#: Channels-last: rows per tile at least this many, so the partial rows (16 bytes per column
#: and row block) stay small next to the input, and fewer of them are zeroed and merged.
#: Matters for C > 128: on (256, 1024), 64 rows (256 KiB tiles) made forward-train 1.14x
#: and backward 1.15x faster than 16 rows; on (3136, 512), 1.36x and 1.2x (measured with
#: two-pass tile statistics).
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

#: Outputs of at least this many bytes are written with non-temporal (streaming) stores by the
#: normalize and dx passes (forward-train, forward-eval and backward; float32 and float64
#: data, float16 is always stored plainly): a plain store
#: first reads the line it overwrites, and in the fused passes it evicts the input that is
#: about to be read again. Below it the output may still be in cache when the caller reads
#: it, and plain stores win: (8, 256, 14, 14), 1.6 MB, ran 2.7x slower streamed. On 2
#: threads, float32: (32, 64, 56, 56) forward-train 1.13x and forward-eval 1.38x faster,
#: (64, 3, 224, 224) 1.11x and 1.30x, (8192, 1024) 1.08x and 1.23x; backward 1.3x on
#: (32, 64, 56, 56), 1.03x on (64, 3, 224, 224), no change channels-last.
STREAM_BYTES = 8 << 20

#: ... and whose contiguous runs have at least this many bytes: channels-first, rows of L
#: values; channels-last, a whole tile of the elementwise passes (whole rows, however many
#: columns). Each run starts and ends with plain stores up to 32-byte
#: boundaries, and a cache line written both ways is slow: streaming (32, 56, 56, 64)
#: channels-last row by row (256-byte runs) made forward-eval 2.6x slower; as whole tiles,
#: 1.1-1.2x faster.
STREAM_RUN_BYTES = 2048

#: Channels-last statistics passes (channel_stats, forward-train) over inputs of at least
#: this many bytes prefetch (smaller inputs are likely in cache already) ...
PREFETCH_BYTES = 8 << 20

#: ... in float32 or float64 with rows of at most PREFETCH_ROW_BYTES, this far ahead: each
#: block of four rows prefetches the values this many bytes past it. Measured on 2 threads,
#: statistics alone, against prefetching the next tile (what an earlier host preferred,
#: below) and against none: float32 (100352, 64) 1.6x and 1.4x faster, (50176, 128)
#: 1.8-2.1x and 1.4-1.6x, (200704, 32) 1.2x and 1.4x, (401408, 16) 1.03x and 1.05x;
#: float64 (100352, 64) 1.8x and 1.35x, (200704, 32) 1.7x and 0.95x. 2 and 8 KiB did
#: about as well; the four rows read at once are 256 bytes to 2 KiB, so this is 2 to 16
#: blocks ahead. (200704, 32) was measured with a copy of the kernel, the rest as it is.
PREFETCH_DISTANCE_BYTES = 4 << 10

#: ... (rows of more bytes do not prefetch: float32 (25088, 256) 0.9-1.0x as fast with 2-8
#: KiB as with none, (12544, 512) 1.0x; the next tile, 0.9x and 0.95x; float16 inputs do
#: not prefetch either: (100352, 64) 0.86x, (50176, 128) 0.9-1.0x) ...
PREFETCH_ROW_BYTES = 512

#: ... and tiles of whole rows with C < PERIODIC_COLUMNS, summed flat, prefetch the next
#: tile when it has at most this many bytes: (2000000, 3) float32 1.3x faster than with
#: none or with 2-8 KiB. On an earlier host the next tile was best for every channels-last
#: tile of 128 KiB: (100352, 64) statistics 1.16x faster than none, (50176, 128) 1.5x,
#: (401408, 16) 1.2x; on the host that measured the distance above it was 0.57-1.0x as
#: fast as none for C >= 16, float32 and float64.
PREFETCH_TILE_BYTES = 128 << 10

#: Channels-last gradient sums over inputs of at least PREFETCH_BYTES (from memory) add one
#: row at a time to the partial rows, instead of four, when rows have at least this many
#: bytes (and at most COLUMN_BLOCK values). Reading four rows at once runs four interleaved
#: streams through each input, which the hardware prefetchers follow worse than one.
#: Backward of 12.8-25.7 MB inputs, 2 threads, against four rows: float32 C = 128
#: 1.27-1.43x, 256 1.21x, 512 1.16x faster, 1024 0.99x; the gradient sums of (3136, 2048),
#: in column blocks, 0.57x, hence the ceiling; float64 C = 64 1.21x,
#: 128 1.1-1.19x. Shorter rows gain little or lose: float32 C = 64 0.91-1.06x, float64
#: C = 32 1.01-1.08x, float32 C = 16 to 48 0.9-1.0x. Inputs in cache keep four rows per
#: update (less arithmetic on the partial rows): one row made (1024, 256) gradient sums
#: 0.65-0.75x as fast.
GRAD_ROW_BYTES = 512
