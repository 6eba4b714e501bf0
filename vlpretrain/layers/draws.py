"""Per-sample random draws: a counter-based generator on tensors, seeded by each row's own seed.

Why: a training batch's random choices (masks, crops, patch dropout, CapPa's parallel captions) drawn from
torch's generator depend on how the global batch is split over processes and micro-batches (each rank has
its own generator state). Drawn from the sample's seed (``batch["sample_seed"]``, made by the data stream from
the sample's identity, see data/README.md), row ``b`` depends only on seed ``b`` and the draw's ``stream``
name, so 2 processes draw what 1 process draws on the doubled batch, and a replayed micro-batch what it drew.

The generator: each value is the 32-bit ``lowbias32`` integer hash (Chris Wellons' hash-prospector, a
well-tested avalanche mixer) applied to the row's key and the value's index, where the key mixes the seed's
two 32-bit halves and a hash of the ``stream`` name. Only int64 tensor ops (values kept below 2**32, the 32-bit
products split in 16-bit halves so nothing overflows), on the seeds' device: no host sync, no generator
object, traceable by torch.compile and CUDA graphs; integer arithmetic, so the same values on any device
(tested on the CPU; no GPU was lent to this work).

:func:`rand` / :func:`randint` are the one place that decides between the per-sample draws (seeds given)
and torch's generator (no seeds: a user's batch through the Python API, evaluation), the latter
bit-identical to the plain ``torch.rand`` / ``torch.randint`` calls they replace.
"""

from __future__ import annotations

import math

import torch

SEED_KEY = "sample_seed"
"""The batch key of the per-sample seeds: int64 (B,), one per row."""

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: keeps a zero seed and a zero stream away from hash(0) = 0


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for x in [0, 2**32) and a 32-bit constant, as two 16-bit-wide products (< 2**49)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection of [0, 2**32) whose output bits each flip with ~1/2 chance per input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _name_hash(name: str) -> int:
    """32-bit FNV-1a of a stream name, in plain Python (torch.compile folds it; it cannot trace zlib.crc32)."""
    h = 0x811C9DC5
    for byte in name.encode():
        h = ((h ^ byte) * 0x01000193) & _M32
    return h


def _keys(seeds: torch.Tensor, stream: str) -> torch.Tensor:
    """(B,) int64 seeds -> (B,) 32-bit keys of (seed, stream)."""
    salt = _name_hash(stream)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _mix(lo ^ _mix(hi ^ _mix(torch.full_like(seeds, (salt + _GOLDEN) & _M32))))


def bits(seeds: torch.Tensor, shape: tuple, stream: str) -> torch.Tensor:
    """(B,) int64 seeds -> (B, *shape) int64 uniform in [0, 2**32); row b depends only on seeds[b] and stream."""
    if seeds.dtype != torch.int64 or seeds.dim() != 1:
        raise ValueError(f"per-sample seeds must be an int64 (B,) tensor, got {seeds.dtype} {tuple(seeds.shape)}.")
    keys = _keys(seeds, stream)[:, None]  # (B, 1)
    index = torch.arange(math.prod(shape), device=seeds.device, dtype=torch.int64)[None]  # (1, n)
    out = _mix(_mix(keys ^ index) ^ keys)  # (B, n)
    return out.reshape(seeds.shape[0], *shape)


def uniform(seeds: torch.Tensor, shape: tuple, stream: str) -> torch.Tensor:
    """(B, *shape) float32 uniform in [0, 1) on a 2**-24 grid (exact in float32)."""
    return (bits(seeds, shape, stream) >> 8).to(torch.float32) * 2.0 ** -24


def fork(seeds: torch.Tensor | None, stream: str) -> torch.Tensor | None:
    """(B,) int64 seeds -> (B,) new int64 seeds in [0, 2**62), independent of the old ones per ``stream``: what a
    callee that draws under its own stream names (the backbone's patch dropout) gets for one call's rows.
    None (no per-sample seeds) stays None."""
    if seeds is None:
        return None
    words = bits(seeds, (2,), stream)  # (B, 2)
    return ((words[:, 0] & 0x3FFFFFFF) << 32) | words[:, 1]


def per_view(seeds: torch.Tensor | None, views: int, stream: str) -> torch.Tensor | None:
    """(B,) seeds -> (views * B,) seeds of view-major rows (view v of sample b at row v * B + b), each view its
    own fork; None stays None."""
    if seeds is None:
        return None
    return torch.cat([fork(seeds, f"{stream}/view{v}") for v in range(views)])


def rand(seeds: torch.Tensor | None, stream: str, batch: int, shape: tuple = (), *, low: float = 0.0,
         high: float = 1.0, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, *shape) float32 uniform in [low, high): per sample from ``seeds`` when given, else from torch's
    generator (``generator`` or the global one) exactly as ``torch.rand`` / ``Tensor.uniform_`` draw."""
    if seeds is None:
        kwargs = _generator(generator)
        if (low, high) == (0.0, 1.0):
            return torch.rand((batch, *shape), device=device, **kwargs)
        return torch.empty((batch, *shape), device=device).uniform_(low, high, **kwargs)
    _check_rows(seeds, batch)
    u = uniform(seeds, tuple(shape), stream)
    return u if (low, high) == (0.0, 1.0) else (low + (high - low) * u).clamp(max=math.nextafter(high, low))


def randint(seeds: torch.Tensor | None, stream: str, high: int, batch: int, shape: tuple = (), *, device=None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, *shape) int64 in [0, high): per sample from ``seeds`` when given (modulo bias below
    high / 2**32), else ``torch.randint`` from torch's generator."""
    if seeds is None:
        kwargs = _generator(generator)
        return torch.randint(high, (batch, *shape), device=device, **kwargs)
    _check_rows(seeds, batch)
    return bits(seeds, tuple(shape), stream) % high


def _generator(generator: torch.Generator | None) -> dict:
    """``generator=`` for a random factory only when one is given: under torch.compile the overload taking a
    generator (even None) rejects a symbolic size, e.g. the caption length the trainer marks dynamic."""
    return {"generator": generator} if generator is not None else {}


def _check_rows(seeds: torch.Tensor, batch: int) -> None:
    if not torch.compiler.is_compiling() and seeds.shape[0] != batch:
        raise ValueError(f"{seeds.shape[0]} per-sample seeds for a batch of {batch} rows: pass one seed per row "
                         f"(batch['{SEED_KEY}'] split with the batch).")
