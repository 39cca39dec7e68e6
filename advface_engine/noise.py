"""Counter-based noise keyed by (seed, a row's bytes), drawn where the rows are.

The random start must not depend on where a row sits (its batch, its chunk, a resumed job), so each row's
noise is a function of the seed and the row's own bytes. It is computed in a few integer tensor operations
on the rows' device: no copy to the host, no generator per row, nothing a CUDA graph could not capture.
Smoothing's noisy copies (``copy_noise``) draw from the same row keys, mixed with the copy's index.
The same row, seed and dtype give the same bits on every device (integer arithmetic; the L2 ball's
logarithm and cosine may round differently in the last place between CPU and GPU).

Exact integer arithmetic throughout: the row key is two polynomial hashes of its 16-bit words modulo primes
below 2**20 (sums below 2**53, exact in float64), the mixing a 32-bit hash in int64 whose multipliers are
below 2**31 (products below 2**63).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
PRIMES = (1_048_573, 1_048_571)  # below 2**20: a row's hash sums stay exact in float64 (below 2**53)
BASES = (65_537, 40_503)
MAX_WORDS = 1 << 16  # 16-bit words of a row: (word + 1) * power * words < 2**53


def _mix(x: Tensor) -> Tensor:
    """A bijection of 32-bit integers whose output bits each depend on every input bit (a two-multiply
    xorshift hash whose multipliers are below 2**31, so x * c < 2**63 stays exact in int64)."""
    x = x ^ (x >> 16)  # a new tensor: the rest runs in place on it
    x.mul_(0x21F0AAAD).bitwise_and_(MASK)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x735A2D97).bitwise_and_(MASK)
    return x.bitwise_xor_(x >> 15)


@functools.lru_cache(maxsize=16)
def _powers(length: int, device: torch.device) -> Tensor:
    """(length, 2) float64: BASES[k] ** j mod PRIMES[k] for j < length."""
    columns = []
    for base, prime in zip(BASES, PRIMES):
        powers, value = [], 1
        for _ in range(length):
            powers.append(value)
            value = value * base % prime
        columns.append(powers)
    return torch.tensor(columns, dtype=torch.float64, device=device).T.contiguous()


@functools.lru_cache(maxsize=64)
def _counters(count: int, stream: int, device: torch.device) -> Tensor:
    """The mixed counters of ``stream``'s draws 0 .. count - 1 (the part of every draw that is no row's)."""
    return _mix(torch.arange(count, dtype=torch.int64, device=device) * 4 + stream)


def row_keys(z: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Two keys per row of z (B, D) from the seed (any non-negative integer) and the row's bytes in its own
    dtype: equal rows get equal keys, other rows other keys (but for a collision of both hashes). The hashes
    are one float64 matrix product of the rows' 16-bit words with the powers, exact (integers below 2**53)."""
    raw = z.detach().contiguous().view(torch.uint8)
    if raw.shape[1] % 2 == 0:
        raw = raw.view(torch.int16)
    if raw.shape[1] >= MAX_WORDS:
        raise ValueError(f"rows of {z.shape[1]} features are too long for the random start's hash")
    words = (raw.to(torch.int32) & 0xFFFF).to(torch.float64) + 1  # unsigned words; + 1: a zero word counts
    hashes = (words @ _powers(words.shape[1], z.device)).to(torch.int64) % torch.tensor(PRIMES, device=z.device)
    state = torch.zeros_like(hashes[:, 0])
    while True:  # the seed 32 bits at a time
        state = _mix(state ^ (seed & MASK))
        seed >>= 32
        if not seed:
            break
    return _mix(state ^ hashes[:, 0]), _mix(_mix(state ^ 0x9E3779B9) ^ hashes[:, 1])


def uniform(keys: tuple[Tensor, Tensor], count: int, stream: int) -> Tensor:
    """(B, count) float64 uniforms in [0, 1) with 32 random bits: draws 0 .. count - 1 of ``stream`` for the
    rows of ``keys``."""
    first, second = (k[:, None] for k in keys)
    return _mix(_counters(count, stream, first.device) ^ first).bitwise_xor_(second).to(torch.float64).mul_(2.0 ** -32)


def normal(keys: tuple[Tensor, Tensor], count: int) -> Tensor:
    """(B, count) float64 standard normals by Box-Muller from streams 1 and 2 of ``keys``."""
    return torch.sqrt(-2 * torch.log1p(-uniform(keys, count, 1))) * torch.cos(2 * torch.pi * uniform(keys, count, 2))


def ball_noise(z: Tensor, seed: int, eps: float, norm: str) -> Tensor:
    """Per row of z, a point drawn uniformly from the eps-ball around 0 (float64, on z's device): each
    coordinate uniform in [-eps, eps] for "linf"; for "l2" a direction uniform on the sphere (Box-Muller
    normals, normalised) at radius eps * U**(1/D)."""
    keys = row_keys(z, seed)
    dim = z.shape[1]
    if norm == "linf":
        return uniform(keys, dim, 0).mul_(2 * eps).sub_(eps)
    draws = normal(keys, dim)
    direction = draws / (draws.norm(dim=1, keepdim=True) + 1e-12)
    return direction * eps * uniform(keys, 1, 3) ** (1.0 / dim)


def copy_noise(keys: tuple[Tensor, Tensor], dim: int, index: int) -> Tensor:
    """(B, dim) float64 standard normals for the ``index``-th noisy copy of the rows of ``keys`` (row_keys):
    drawn from keys mixed with index + 1, so no copy reuses the random start's draws or another copy's."""
    salt = _mix(torch.tensor(index + 1, dtype=torch.int64, device=keys[0].device))
    return normal((_mix(keys[0] ^ salt), _mix(keys[1] ^ salt)), dim)
