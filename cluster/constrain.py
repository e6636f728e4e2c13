"""Token masks of constrained decoding, as they travel and as the last stage applies them.

A mask is the set of tokens a grammar allows at one position, packed one bit per token:
bit t of little-endian byte t // 8 (llguidance's bitmask layout, 32-bit words written
little-endian). The coordinator computes the masks (it keeps the grammar's state,
`coordinator/constrain`); a worker only applies them: every token outside the mask gets
a logit of −inf before the verdict, so greedy picks, sampling and the rejection rule all
see the constrained distribution. Tokens past the mask's end are not allowed.
"""

from __future__ import annotations

import numpy as np


def allowed(mask: bytes, n: int) -> np.ndarray:
    """The mask as n booleans (True: the token is allowed)."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
    if bits.size < n:
        bits = np.concatenate([bits, np.zeros(n - bits.size, dtype=np.uint8)])
    return bits[:n].view(bool)


def masked(row: np.ndarray, mask: bytes) -> np.ndarray:
    """A copy of a logit row with −inf outside the mask. A mask that allows nothing (a
    grammar in error) leaves the row as it is rather than make every token impossible."""
    keep = allowed(mask, row.shape[-1])
    if not keep.any():
        return np.array(row, dtype=np.float32)
    return np.where(keep, row, np.float32(-np.inf)).astype(np.float32, copy=False)


def pack(tokens: list[int] | np.ndarray, n: int) -> bytes:
    """The mask allowing exactly `tokens` out of n (tests, and the coordinator's fallbacks)."""
    bits = np.zeros(((n + 31) // 32) * 32, dtype=np.uint8)
    bits[np.asarray(tokens, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").tobytes()
