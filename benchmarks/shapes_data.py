"""Generated image folders standing in for a newcomer's own data: N classes of drawn shapes or textures,
each image a random size, position and rotation on a noisy background in a colour whose hue leans to its class's
(+-0.2 of the hue circle, so neighbouring classes share colours; --any-colour: any), saved as 64x64 PNG files;
--noise: the pixel noise (default 28) on the background, and with --noise-over on the shapes too (a harder set).

Three class sets that share nothing, so a recipe tuned on one can be checked on the other:
``A`` circle, square, triangle, cross, ring, bars, dots (tuning);
``B`` star, hexagon, ellipse, chevron, checker, diamond, half-disc (tuning, with --noise-over the harder one);
``C`` pentagon, arrow, crescent, zigzag, frame, ell (the held-out check: never tuned on).

    python benchmarks/shapes_data.py OUT --set B --classes 5 --train 240 --val 60 --seed 7

writes OUT/train/<class>/*.png and OUT/val/<class>/*.png (with --flat, OUT/<class>/*.png: no split).
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from snnet.utils.errors import UsageError
from snnet.utils.fileio import replaceable_image_folder


def _poly(cx: float, cy: float, r: float, n: int, rot: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    k = 2 * n if inner else n
    for i in range(k):
        rr = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / k
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw(kind: str, d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, colour: tuple) -> None:
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = max(2, int(r / 3))
    if kind == "circle":
        d.ellipse(box, fill=colour)
    elif kind == "square":
        d.polygon(_poly(cx, cy, r, 4, rot), fill=colour)
    elif kind == "triangle":
        d.polygon(_poly(cx, cy, r, 3, rot), fill=colour)
    elif kind == "cross":
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=w)
    elif kind == "ring":
        d.ellipse(box, outline=colour, width=w)
    elif kind == "bars":
        for i in range(-2, 3):
            x = cx + i * r / 2.2
            d.line((x, cy - r, x, cy + r), fill=colour, width=max(2, w // 2))
    elif kind == "dots":
        for _ in range(int(rng.integers(5, 9))):
            x, y = rng.uniform(4, size - 4), rng.uniform(4, size - 4)
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    elif kind == "star":
        d.polygon(_poly(cx, cy, r, 5, rot, inner=0.42), fill=colour)
    elif kind == "hexagon":
        d.polygon(_poly(cx, cy, r, 6, rot), fill=colour)
    elif kind == "ellipse":
        d.ellipse((cx - r, cy - r * 0.45, cx + r, cy + r * 0.45), fill=colour)
    elif kind == "chevron":
        pts = [(cx - r, cy - r * 0.6), (cx, cy + r * 0.5), (cx + r, cy - r * 0.6)]
        d.line(pts, fill=colour, width=w, joint="curve")
    elif kind == "checker":
        s = max(3, int(r / 2))
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x, y = cx - 2 * s + i * s, cy - 2 * s + j * s
                    d.rectangle((x, y, x + s, y + s), fill=colour)
    elif kind == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.55, cy), (cx, cy + r), (cx - r * 0.55, cy)], fill=colour)
    elif kind == "half-disc":
        start = float(rng.uniform(0, 360))
        d.pieslice(box, start, start + 180, fill=colour)
    elif kind == "pentagon":
        d.polygon(_poly(cx, cy, r, 5, rot), fill=colour)
    elif kind == "arrow":
        c, s_ = math.cos(rot), math.sin(rot)
        pts = [(-1, -0.18), (0.2, -0.18), (0.2, -0.5), (1, 0), (0.2, 0.5), (0.2, 0.18), (-1, 0.18)]
        d.polygon([(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in pts], fill=colour)
    elif kind == "crescent":
        d.ellipse(box, fill=colour)
        off = r * 0.55
        bite = (cx + off * math.cos(rot), cy + off * math.sin(rot))
        d.ellipse((bite[0] - r * 0.85, bite[1] - r * 0.85, bite[0] + r * 0.85, bite[1] + r * 0.85),
                  fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    elif kind == "zigzag":
        c, s_ = math.cos(rot), math.sin(rot)
        pts = [(-1 + 0.5 * i, 0.45 * (-1) ** i) for i in range(5)]
        d.line([(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in pts], fill=colour, width=w,
               joint="curve")
    elif kind == "frame":
        d.polygon(_poly(cx, cy, r, 4, rot), outline=colour, width=w)
    elif kind == "ell":
        c, s_ = math.cos(rot), math.sin(rot)
        pts = [(-0.6, -1), (-0.1, -1), (-0.1, 0.5), (0.8, 0.5), (0.8, 1), (-0.6, 1)]
        d.polygon([(cx + r * (x * c - y * s_), cy + r * (x * s_ + y * c)) for x, y in pts], fill=colour)
    else:
        raise ValueError(kind)


SETS = {"A": ["circle", "square", "triangle", "cross", "ring", "bars", "dots"],
        "B": ["star", "hexagon", "ellipse", "chevron", "checker", "diamond", "half-disc"],
        "C": ["pentagon", "arrow", "crescent", "zigzag", "frame", "ell"]}


NOISE = 28.0  # the pixel noise's standard deviation (0-255 scale) by default


def image(kind: str, rng: np.random.Generator, size: int = 64, hue: float | None = None,
          noise_sd: float = NOISE, noise_over: bool = False) -> Image.Image:
    """One image of class `kind`: a random background tint with pixel noise (`noise_sd`), the shape in a random
    colour (with `hue`, a hue within +-0.2 of it: the class's colour cue, shared in part with its neighbours), a
    slight blur. `noise_over`: the same noise over the shape too (by default the shape is one flat colour on the
    noisy background, which a CNN tells apart from the noise at any level: set B's anchors scored 100 % at noise
    120)."""
    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, noise_sd, (size, size, 3))
    tint = np.broadcast_to(bg[None, None, :] * 0.5 + 64, (size, size, 3))
    img = Image.fromarray(np.clip(tint if noise_over else tint + noise, 0, 255).astype(np.uint8))
    if hue is None:
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    else:
        import colorsys
        h = (hue + rng.uniform(-0.2, 0.2)) % 1.0
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    _draw(kind, ImageDraw.Draw(img), rng, size, colour)
    if noise_over:
        img = Image.fromarray(np.clip(np.asarray(img, dtype=float) + noise, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def write(out: Path, kinds: list[str], train: int, val: int, seed: int = 0, size: int = 64,
          flat: bool = False, colours: bool = True, noise_sd: float = NOISE, noise_over: bool = False) -> Path:
    """`train` + `val` images of each class in `kinds` under out/train/ and out/val/ (flat: out/<class>/);
    `colours`: each class's shapes lean to a hue of its own (spread evenly, +-0.2), else any colour; `noise_sd`:
    the pixel noise (more: harder to see the shape); `noise_over`: over the shape too."""
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for k, kind in enumerate(kinds):
        hue = k / len(kinds) if colours else None
        for split, n in (("train", train), ("val", val)):
            folder = tmp / kind if flat else tmp / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image(kind, rng, size, hue, noise_sd, noise_over).save(folder / f"{split}_{i:04d}.png")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--set", choices=sorted(SETS), default="A")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--train", type=int, default=240, help="training images per class")
    p.add_argument("--val", type=int, default=60, help="validation images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--flat", action="store_true", help="one folder per class, no train/val split")
    p.add_argument("--any-colour", action="store_true", help="shapes in any colour (no class hue: shape alone)")
    p.add_argument("--noise", type=float, default=NOISE,
                   help=f"the pixel noise's standard deviation, 0-255 (default {NOISE:g}; more: a harder set)")
    p.add_argument("--noise-over", action="store_true",
                   help="the noise over the shapes too, not only their background (hides the shapes: harder)")
    a = p.parse_args(argv)
    if not 0 <= a.noise <= 255:
        p.error(f"--noise {a.noise:g} is outside 0-255; pass a standard deviation on the 0-255 pixel scale")
    try:
        replaceable_image_folder(a.out, {*(k for kinds in SETS.values() for k in kinds), "train", "val"})
    except UsageError as e:
        raise SystemExit(f"error: OUT {e}") from None
    out = write(Path(a.out), SETS[a.set][:a.classes], a.train, a.val, a.seed, a.size, a.flat, not a.any_colour,
                a.noise, a.noise_over)
    print(f"wrote {out}: {a.classes} classes of set {a.set}, {a.train} + {a.val} images each")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
