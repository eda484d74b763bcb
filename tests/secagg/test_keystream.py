"""KeystreamAccumulator: block-wise masks equal the whole AES-CTR keystream, mod 2^k."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bract.secagg.crypto import STREAM_BLOCK, KeystreamAccumulator, KeystreamBlocks, keystream


@settings(max_examples=30, deadline=None)
@given(size=st.sampled_from([0, 1, 3, STREAM_BLOCK - 1, STREAM_BLOCK, 2 * STREAM_BLOCK + 7]),
       dtype=st.sampled_from([np.uint32, np.uint64]),
       keys=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=3),
       signs=st.lists(st.booleans(), min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_adding_and_subtracting_streams_is_ring_arithmetic_on_whole_keystreams(
    size, dtype, keys, signs, seed
) -> None:
    # Property: acc +/- the keystreams of several keys, block by block, equals the
    # same ring arithmetic on the whole keystreams (so the block size is invisible).
    start = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, size, dtype=dtype,
                                                 endpoint=True)
    acc = KeystreamAccumulator(start.copy())
    expected = start.copy()
    for key, plus in zip(keys, signs[:len(keys)], strict=True):
        stream = np.frombuffer(keystream(key, size * np.dtype(dtype).itemsize), dtype=dtype)
        (acc.add if plus else acc.subtract)(key)
        expected = expected + stream if plus else expected - stream
    assert acc.acc.dtype == dtype and np.array_equal(acc.acc, expected)


def test_blocks_cover_the_vector_in_order_and_the_scratch_is_one_block() -> None:
    blocks = KeystreamBlocks(2 * STREAM_BLOCK + 7, np.uint64)
    covered = [(w.start, w.stop, len(v)) for w, v in blocks.under(b"k" * 32)]
    assert covered == [(0, STREAM_BLOCK, STREAM_BLOCK),
                       (STREAM_BLOCK, 2 * STREAM_BLOCK, STREAM_BLOCK),
                       (2 * STREAM_BLOCK, 2 * STREAM_BLOCK + 7, 7)]
    assert len(blocks._buf) <= 8 * STREAM_BLOCK + 16
