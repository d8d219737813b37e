"""Writes a generated image-classification dataset: ten classes of drawn shapes.

    python examples/shapes.py OUT [--train 300] [--val 200] [--size 64] [--seed 0]

OUT/train/<class>/*.png and OUT/val/<class>/*.png, the layout train.py reads. Each picture is
one shape (its class) of a random colour, size, position and rotation on a noisy background of
another random colour, with two small distracting blobs; some pairs (square and diamond, hexagon
and circle, ring and circle) differ only in detail at small sizes, so a small Mixer does not
reach 100%. That makes it a dataset on which a change to a trained model (quantised weights,
another backend) shows in the validation top-1. The same seed writes the same files.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mixer  # noqa: E402  (atomic writes and the command-line conventions)
from mixer import MixerError  # noqa: E402

CLASSES = ("circle", "cross", "diamond", "hexagon", "ring", "square", "star", "triangle",
           "two_bars_h", "two_bars_v")


def _polygon(cx, cy, r, corners, turn, inner=None):
    """Corners of a regular polygon (or a star when `inner` is the inner radius's share)."""
    points = []
    steps = corners * (2 if inner else 1)
    for i in range(steps):
        radius = r * (inner if inner and i % 2 else 1.0)
        angle = turn + 2 * math.pi * i / steps
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw(name: str, size: int, rng) -> "PIL.Image.Image":  # noqa: F821
    """One picture of the class `name`."""
    from PIL import Image, ImageDraw
    background = rng.integers(0, 256, 3)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    noise = rng.normal(0, 24, (size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    pen = ImageDraw.Draw(img)
    for _ in range(2):  # distractors: small blobs of their own colours
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(1, size / 14)
        pen.ellipse((x - r, y - r, x + r, y + r),
                    fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    r = rng.uniform(size / 8, size / 3.5)
    cx, cy = rng.uniform(r, size - r, 2)
    turn = rng.uniform(0, 2 * math.pi)
    width = max(1, round(r / 3))
    if name == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif name == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=width)
    elif name in ("square", "diamond"):
        # a square stands on a side (turned by at most 20 degrees), a diamond on a corner
        tilt = rng.uniform(-math.pi / 9, math.pi / 9) + (math.pi / 4 if name == "square" else 0)
        pen.polygon(_polygon(cx, cy, r, 4, tilt), fill=colour)
    elif name == "triangle":
        pen.polygon(_polygon(cx, cy, r, 3, turn), fill=colour)
    elif name == "hexagon":
        pen.polygon(_polygon(cx, cy, r, 6, turn), fill=colour)
    elif name == "star":
        pen.polygon(_polygon(cx, cy, r, 5, turn, inner=0.45), fill=colour)
    elif name == "cross":
        for a in (turn, turn + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            pen.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)
    else:  # two parallel bars, horizontal or vertical
        for offset in (-r / 2, r / 2):
            if name == "two_bars_h":
                pen.line((cx - r, cy + offset, cx + r, cy + offset), fill=colour, width=width)
            else:
                pen.line((cx + offset, cy - r, cx + offset, cy + r), fill=colour, width=width)
    return img


def write(out: str, train: int, val: int, size: int, seed: int) -> int:
    """Writes the dataset; returns the number of files written."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise MixerError(f"{mixer.printable(out)} exists and is not an empty folder: give a "
                         f"new folder")
    written = 0
    for split, count, stream in (("train", train, 0), ("val", val, 1)):
        for c, name in enumerate(CLASSES):
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            rng = np.random.default_rng((seed, stream, c))
            for i in range(count):
                with mixer.atomic_write(os.path.join(folder, f"{i:05d}.png")) as f:
                    draw(name, size, rng).save(f, format="PNG")
                written += 1
    return written


def main(argv=None) -> int:
    parser = mixer.ArgumentParser(prog="shapes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT", help="a new (or empty) folder")
    parser.add_argument("--train", type=int, default=300, help="training images per class")
    parser.add_argument("--val", type=int, default=200, help="validation images per class")
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body():
        for what in ("train", "val"):
            mixer.positive_int(getattr(args, what), f"--{what}")
        if not 16 <= args.size <= 4096:
            raise MixerError(f"--size must be between 16 and 4096 pixels, got {args.size}")
        if args.seed < 0:
            raise MixerError(f"--seed must be >= 0, got {args.seed}")
        n = write(args.out, args.train, args.val, args.size, args.seed)
        print(f"wrote {n} pictures of {len(CLASSES)} classes to {mixer.printable(args.out)}")
    return mixer.run_main("shapes.py", body)


if __name__ == "__main__":
    sys.exit(main())
