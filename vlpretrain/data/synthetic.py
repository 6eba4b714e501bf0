"""Synthetic captioned scenes: the embedded dataset of the demo and the tests (``vlpretrain synth``).

Each image shows 1-3 shapes (circle, square, triangle) with a colour and a size on a plain
background. Captions come from a small grammar and name attributes, relations and counts, e.g.
"a small red circle left of a large blue square", "two green triangles", "a yellow square at the
top right". Telling "red circle left of blue square" from "blue circle left of red square" needs
both attributes and their binding to positions, so a bag-of-words shortcut does not solve it.

Every sample is drawn from its own seeded RNG (``seed``, split, index), so output does not depend on
sharding and the ``val/`` split is fixed for a seed. Each ``.json`` holds all captions and the scene.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

from vlpretrain.data.writer import ShardWriter, encode_jpeg

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.19}  # radius as a share of the image side
NUMBERS = {2: "two", 3: "three"}


def _place(rng: random.Random, radius: float, placed: list[dict]) -> tuple[float, float] | None:
    """A centre for a shape that overlaps none placed so far (None after many tries)."""
    for _ in range(100):
        x, y = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
        if all(max(abs(x - o["x"]), abs(y - o["y"])) > radius + o["r"] + 0.02 for o in placed):
            return x, y
    return None


def random_scene(rng: random.Random) -> dict:
    """1-3 non-overlapping objects; sometimes all of one colour and shape (a counting scene)."""
    count = rng.choice((1, 2, 2, 3))
    same = count > 1 and rng.random() < 0.3
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    objects: list[dict] = []
    while len(objects) < count:
        size = rng.choice(list(SIZES))
        centre = _place(rng, SIZES[size], objects)
        if centre is None:  # crowded: start over with a fresh layout
            objects = []
            continue
        objects.append({"shape": shape if same else rng.choice(SHAPES),
                        "color": color if same else rng.choice(list(COLORS)),
                        "size": size, "x": round(centre[0], 4), "y": round(centre[1], 4), "r": SIZES[size]})
    background = tuple(rng.randint(200, 255) for _ in range(3))
    return {"objects": objects, "background": background}


def render(scene: dict, image_size: int) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        cx, cy, r = o["x"] * image_size, o["y"] * image_size, o["r"] * image_size
        fill = COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img


def _phrase(o: dict, with_size: bool = True) -> str:
    words = f"{o['size'] + ' ' if with_size else ''}{o['color']} {o['shape']}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _relation(a: dict, b: dict) -> str:
    """Where ``a`` is relative to ``b`` along the axis where they differ most."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _region(o: dict) -> str:
    vertical = "top" if o["y"] < 1 / 3 else "bottom" if o["y"] > 2 / 3 else ""
    horizontal = "left" if o["x"] < 1 / 3 else "right" if o["x"] > 2 / 3 else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def captions(scene: dict) -> list[str]:
    """Every true caption of a scene under the grammar (the first is the canonical one)."""
    objs = scene["objects"]
    if len(objs) == 1:
        o = objs[0]
        return [f"{_phrase(o)} at the {_region(o)}", _phrase(o), f"{_phrase(o, False)} at the {_region(o)}"]
    first, second = sorted(objs, key=lambda o: (o["x"], o["y"]))[:2]
    out = [f"{_phrase(first)} {_relation(first, second)} {_phrase(second)}",
           f"{_phrase(second)} {_relation(second, first)} {_phrase(first)}"]
    kinds = {(o["color"], o["shape"]) for o in objs}
    if len(kinds) == 1:
        color, shape = kinds.pop()
        out.insert(0, f"{NUMBERS[len(objs)]} {color} {shape}s")
    else:
        out.append(f"{NUMBERS[len(objs)]} shapes: " + " and ".join(_phrase(o, False) for o in objs))
    return out


def write_split(out_dir: Path, split: str, num_samples: int, image_size: int, seed: int,
                samples_per_shard: int) -> dict[str, int]:
    with ShardWriter(out_dir / split, samples_per_shard, mtime=0) as writer:
        for i in range(num_samples):
            scene = random_scene(random.Random(f"synth/{seed}/{split}/{i}"))
            jpeg = encode_jpeg(render(scene, image_size), quality=90)
            writer.write(f"{split}{i:08d}", jpeg, captions(scene), {"scene": scene})
    return writer.sizes


def synthesize(out_dir: str | Path, num_samples: int, image_size: int = 64, seed: int = 0,
               samples_per_shard: int = 250, num_val: int | None = None) -> dict[str, dict[str, int]]:
    """Write ``OUT/train`` (num_samples) and ``OUT/val`` (num_val, default 10%, at least 1) shards."""
    if num_samples < 1 or image_size < 8:
        raise ValueError(f"--num-samples {num_samples} must be >= 1 and --image-size {image_size} >= 8.")
    num_val = max(1, num_samples // 10) if num_val is None else num_val
    out_dir = Path(out_dir)
    return {split: write_split(out_dir, split, n, image_size, seed, samples_per_shard)
            for split, n in (("train", num_samples), ("val", num_val))}


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic captioned shape scenes as train/ and val/ shards")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--num-samples", type=int, required=True, help="training samples")
    p.add_argument("--num-val", type=int, default=None, help="validation samples (default 10%%, >= 1)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=250, help="samples per shard (default 250)")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    sizes = synthesize(args.out, args.num_samples, args.image_size, args.seed, args.samples_per_shard,
                       args.num_val)
    for split, shards in sizes.items():
        print(f"{split}: {sum(shards.values())} samples in {len(shards)} shard(s) -> {Path(args.out) / split}")
    return 0
