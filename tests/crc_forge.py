"""Bytes with a chosen crc32c, for tests of what a given checksum (such as one that masks to 0) does.

For a fixed prefix, the crc32c of the prefix followed by four more bytes is affine over GF(2) in
those 32 bits and a bijection: the bits come from solving that linear system (Gaussian elimination
on its columns).
"""

from __future__ import annotations

from gpusaver.format import crc


def force_crc(prefix: bytes, target: int) -> bytes:
    """Four bytes x with crc32c(prefix + x) == target."""
    state = crc.value(prefix)
    base = crc.extend(state, bytes(4))
    basis: list[tuple[int, int]] = []
    for bit in range(32):
        vec, src = crc.extend(state, (1 << bit).to_bytes(4, "little")) ^ base, 1 << bit
        for bvec, bsrc in basis:
            if vec ^ bvec < vec:
                vec, src = vec ^ bvec, src ^ bsrc
        if vec:
            basis.append((vec, src))
            basis.sort(reverse=True)
    want, x = target ^ base, 0
    for bvec, bsrc in basis:
        if want ^ bvec < want:
            want, x = want ^ bvec, x ^ bsrc
    assert want == 0
    out = x.to_bytes(4, "little")
    assert crc.value(prefix + out) == target
    return out
