"""The random start's counter-based noise against a pure-Python implementation of the same formulas, and its
statistics: uniform in the ball, independent across rows and coordinates, a function of (seed, row bytes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advface_engine.noise import BASES, MASK, PRIMES, ball_noise, copy_noise, row_keys, uniform


def mix(x: int) -> int:
    x ^= x >> 16
    x = x * 0x21F0AAAD & MASK
    x ^= x >> 15
    x = x * 0x735A2D97 & MASK
    return x ^ (x >> 15)


def python_linf(row: torch.Tensor, seed: int, eps: float) -> list[float]:
    """ball_noise(row, seed, eps, "linf") written with Python integers, word by word."""
    data = row.contiguous().view(torch.uint8).numpy().tobytes()
    words = [int.from_bytes(data[i:i + 2], "little") + 1 for i in range(0, len(data), 2)]
    hashes = [sum(w * pow(base, j, prime) for j, w in enumerate(words)) % prime for base, prime in zip(BASES, PRIMES)]
    state = 0
    while True:
        state = mix(state ^ (seed & MASK))
        seed >>= 32
        if not seed:
            break
    first, second = mix(state ^ hashes[0]), mix(mix(state ^ 0x9E3779B9) ^ hashes[1])
    return [eps * (2 * ((mix(mix(4 * j) ^ first) ^ second) * 2.0 ** -32) - 1) for j in range(row.numel())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3, 2**70 + 1])
def test_noise_equals_the_python_formulas(dtype, seed):
    z = F.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(seed % 1000)), dim=1).to(dtype)
    got = ball_noise(z, seed, 0.1, "linf")
    want = torch.tensor([python_linf(row, seed, 0.1) for row in z], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def python_copy_noise(first: int, second: int, count: int, index: int) -> list[float]:
    """copy_noise for one row's keys written with Python integers: Box-Muller of streams 1 and 2 of the keys
    mixed with mix(index + 1)."""
    salt = mix(index + 1)
    first, second = mix(first ^ salt), mix(second ^ salt)
    u = [[(mix(mix(4 * j + s) ^ first) ^ second) * 2.0 ** -32 for j in range(count)] for s in (1, 2)]
    return [math.sqrt(-2 * math.log1p(-a)) * math.cos(2 * math.pi * b) for a, b in zip(*u)]


@pytest.mark.parametrize("index", [0, 1, 29])
def test_copy_noise_equals_the_python_formulas(index):
    z = F.normalize(torch.randn(3, 24, generator=torch.Generator().manual_seed(index)), dim=1)
    keys = row_keys(z, 11)
    want = torch.tensor([python_copy_noise(int(a), int(b), 24, index) for a, b in zip(*keys)], dtype=torch.float64)
    torch.testing.assert_close(copy_noise(keys, 24, index), want, rtol=0, atol=1e-12)


def test_noise_is_a_function_of_seed_and_row_bytes():
    z = F.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    noise = ball_noise(z, 3, 0.1, "linf")
    assert torch.equal(ball_noise(z[10:13], 3, 0.1, "linf"), noise[10:13])  # rows alone: the same noise
    assert torch.equal(ball_noise(z.flip(0), 3, 0.1, "linf"), noise.flip(0))
    assert torch.equal(ball_noise(z[[5, 5]], 3, 0.1, "linf")[1], noise[5])  # equal rows, equal noise
    assert not torch.equal(ball_noise(z, 4, 0.1, "linf"), noise)
    assert not torch.equal(ball_noise(z.double(), 3, 0.1, "linf"), noise)  # the bytes in the row's own dtype
    near = z[:1].clone()
    near[0, 0] = torch.nextafter(near[0, 0], torch.tensor(2.0))  # one bit apart
    assert (ball_noise(near, 3, 0.1, "linf") != noise[:1]).float().mean() > 0.99
    keys = row_keys(z, 3)
    assert torch.unique(keys[0] * 2**32 + keys[1]).numel() == 64


def test_noise_is_uniform_in_the_ball_and_uncorrelated():
    z = F.normalize(torch.randn(4000, 64, generator=torch.Generator().manual_seed(1)), dim=1)
    linf = ball_noise(z, 0, 0.2, "linf")
    assert linf.abs().max() <= 0.2
    counts = np.histogram(linf.numpy(), bins=20, range=(-0.2, 0.2))[0]
    expected = linf.numel() / 20
    assert ((counts - expected) ** 2 / expected).sum() < 45  # chi-square, 19 dof: p < 0.001 beyond ~43.8
    flat = linf / 0.2
    assert abs(flat.mean()) < 0.01 and abs(flat.var() - 1 / 3) < 0.01
    columns = torch.corrcoef(flat[:, :16].T) - torch.eye(16, dtype=torch.float64)
    rows = torch.corrcoef(flat[:200]) - torch.eye(200, dtype=torch.float64)
    assert columns.abs().max() < 5 / 4000 ** 0.5 and rows.abs().max() < 6 / 64 ** 0.5
    u = uniform(row_keys(z, 0), 64, 1)
    assert 0 <= u.min() and u.max() < 1 and not torch.equal(u, uniform(row_keys(z, 0), 64, 2))  # streams differ
    l2 = ball_noise(z, 0, 0.2, "l2")
    radius = l2.norm(dim=1)
    assert radius.max() <= 0.2 + 1e-12
    # uniform in the 64-d ball: P(r <= 0.2 t) = t**64, so the median radius is 0.2 * 0.5 ** (1 / 64)
    assert abs(radius.median() - 0.2 * 0.5 ** (1 / 64)) < 0.002
    direction = l2 / radius[:, None]
    assert abs(direction.mean()) < 0.01 and abs(direction.pow(2).mean() * 64 - 1) < 0.02


def test_noise_refuses_rows_too_long_for_its_hash():
    with pytest.raises(ValueError, match="too long"):
        ball_noise(torch.zeros(1, 1 << 16, dtype=torch.float16), 0, 0.1, "linf")


@pytest.mark.gpu
def test_noise_on_the_gpu_equals_the_cpus():
    z = F.normalize(torch.randn(256, 512, generator=torch.Generator().manual_seed(2)), dim=1)
    for norm in ("linf", "l2"):
        cpu = ball_noise(z, 5, 0.1, norm)
        gpu = ball_noise(z.cuda(), 5, 0.1, norm).cpu()
        if norm == "linf":
            assert torch.equal(cpu, gpu)
        else:  # log and cos may round differently in the last place
            torch.testing.assert_close(gpu, cpu, rtol=1e-12, atol=1e-14)
