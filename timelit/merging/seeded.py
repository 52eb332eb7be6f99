"""Reproducible uniforms per tensor entry: the same values whatever the chunking or processing order.

    u = uniforms("0/2", "visual.proj", start=0, stop=4096)   # DARE's stream for seed 0, expert 2

A stream (a string naming the technique's own draw, e.g. DARE's ``"{seed}/{expert}"``) over tensor ``key`` is cut
into blocks of 65,536 entries; block b's uniforms come from a generator seeded with a hash of (stream, key, b). Any
slice of the tensor therefore reads the same values, so a merge recomputed with another chunk size, or after a
restart, gives the same weights (the FoMo-in-Flux pipeline re-draws from the global RNG on every call). DARE's masks
and the random merge's choices both come from here, under streams that cannot collide.
"""

from __future__ import annotations

import hashlib

import torch

BLOCK = 1 << 16


def uniforms(stream: str, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Entries ``start:stop`` of the float32 uniforms in [0, 1) of ``stream`` over tensor ``key``."""
    out = torch.empty(stop - start) if out is None else out
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        digest = hashlib.blake2b(f"{stream}/{key}/{block}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        offset = block * BLOCK
        low, high = max(start, offset), min(stop, offset + BLOCK)
        # Drawing n uniforms gives the first n of a longer draw (torch's CPU generator is serial; a test guards
        # this), so a block is drawn only up to the end of the slice, straight into place when the slice starts it.
        if low == offset:
            torch.rand(high - offset, generator=generator, out=out[low - start : high - start])
        else:
            out[low - start : high - start] = torch.rand(high - offset, generator=generator)[low - offset :]
    return out
