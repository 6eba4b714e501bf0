"""Helpers of the objective tests: seeded debug models, random captions and a learnable shapes task.

The shapes task: a 32 px image holds one shape (square, disc or bar) of one colour (red, green,
blue or yellow), big or small, at a random place on a noisy background; its caption is
``BOS colour shape [size] EOS`` (the size word only for big shapes, so lengths and padding vary).
A batch of 24 covers every (colour, shape, size) once, so in-batch retrieval is well posed.
"""

from __future__ import annotations

import itertools

import torch

from tests.helpers import make_model, make_text  # noqa: F401  (re-exported to the objective tests)

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0], [1.0, 0.9, 0.1]])
COLOUR_TOKENS, SHAPE_TOKENS, BIG_TOKEN = [10, 11, 12, 13], [20, 21, 22], 30
COMBOS = list(itertools.product(range(4), range(3), (False, True)))  # 24 captions
TEXT_LEN = 6


def random_batch(batch: int = 6, length: int = 10, seed: int = 0, image_size: int = 32) -> dict:
    """Noise images and random captions of varied length (padding included)."""
    g = torch.Generator().manual_seed(seed + 1000)
    lengths = [length - (i % 4) for i in range(batch)]
    ids, mask = make_text(batch, length, lengths=lengths, seed=seed)
    return {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=g),
            "input_ids": ids, "attention_mask": mask}


def _draw(colour: int, shape: int, big: bool, g: torch.Generator, size: int = 32) -> torch.Tensor:
    r = 8.0 if big else 4.5
    cy, cx = (torch.rand(2, generator=g) * (size - 2 * r - 2) + r + 1).tolist()
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if shape == 0:
        inside = ((y - cy).abs() < r) & ((x - cx).abs() < r)
    elif shape == 1:
        inside = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
    else:
        inside = ((y - cy).abs() < r / 3) & ((x - cx).abs() < r)
    image = 0.3 + 0.05 * torch.randn(3, size, size, generator=g)
    image = torch.where(inside, COLOURS[colour][:, None, None].expand(3, size, size), image)
    return (image - 0.45) / 0.3


def shapes_batch(seed: int, combos=None) -> dict:
    """One image per (colour, shape, size) combo (all 24 by default), with its caption."""
    g = torch.Generator().manual_seed(seed)
    combos = COMBOS if combos is None else combos
    images, ids = [], torch.zeros(len(combos), TEXT_LEN, dtype=torch.long)
    for i, (colour, shape, big) in enumerate(combos):
        images.append(_draw(colour, shape, big, g))
        words = [1, COLOUR_TOKENS[colour], SHAPE_TOKENS[shape]] + ([BIG_TOKEN] if big else []) + [2]
        ids[i, :len(words)] = torch.tensor(words)
    return {"pixel_values": torch.stack(images), "input_ids": ids, "attention_mask": (ids != 0).long()}


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> gradient (zeros where none) of every parameter."""
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


def max_grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest absolute difference over all parameters, and where."""
    assert a.keys() == b.keys()
    worst = max(((float((a[k] - b[k]).abs().max()), k) for k in a), default=(0.0, ""))
    return worst
