"""A masked vector is indistinguishable from uniform; the test flags weak masking.

The statistic is :func:`bract.audit.uniformity.uniformity_test` (the one the
secure-aggregation audit uses): bit balance at every bit position, chi-square
over the top and low bytes, and a Kolmogorov-Smirnov test of value / 2^32, at a
family-wise significance of 1e-9 here. A uniform vector passes with
overwhelming probability; the negative controls show the same test rejects an
unmasked encoding and masks with too little entropy.
"""

from __future__ import annotations

import numpy as np
from secagg_helpers import make_federation, random_inputs, run_to_masked

from bract.audit.uniformity import uniformity_test
from bract.secagg.crypto import keystream
from bract.secagg.encoding import EncodingConfig, encode

D = 40_000
ENC = EncodingConfig(clip=1.0, frac_bits=12, max_weight=100)  # ring 2^32 for n = 3


def looks_uniform(v: np.ndarray, bits: int = 32) -> bool:
    return uniformity_test(v, bits, alpha=1e-9).passed


def _masked_vectors(inputs) -> dict[int, np.ndarray]:
    f = make_federation(3, encoding=ENC)
    st = run_to_masked(f, 1, inputs, D)
    assert st.cfg.ring_bits == 32
    return {v: np.frombuffer(m.data, dtype=np.uint32)[:-1] for v, m in st.masked.items()}


def test_masked_vector_looks_uniform() -> None:
    # worst-case inputs: constant vectors (all zeros, all at the clip bound)
    inputs = {0: (np.zeros(D, np.float32), 1), 1: (np.ones(D, np.float32), 99),
              2: (np.full(D, -1.0, np.float32), 50)}
    masked = _masked_vectors(inputs)
    for v in masked.values():
        assert looks_uniform(v)
    # two clients' masked vectors are unrelated, and so is their difference
    assert looks_uniform(masked[0] - masked[1])


def test_negative_controls_are_flagged() -> None:
    x = random_inputs(1, D)[0][0]
    plain = encode(x, 7, ENC, 32)[:-1]
    assert not looks_uniform(plain)  # unmasked encoding
    ks = np.frombuffer(keystream(b"k" * 32, 4 * D), dtype=np.uint32)
    assert looks_uniform(ks)  # the positive control: a true keystream
    assert not looks_uniform(plain + (ks & np.uint32(0xFFFF)))  # 16-bit masks
    const = encode(np.full(D, 0.25), 3, ENC, 32)[:-1]
    assert not looks_uniform(const + (ks & np.uint32(0xFFFFFF00)))  # low byte left unmasked
    # a low-entropy mask: one 32-bit value repeated over the vector (structure leaks)
    assert not looks_uniform(plain + ks[0])
