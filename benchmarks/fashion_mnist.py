"""Real photos as an image folder: Fashion-MNIST (70,000 28x28 grayscale product photos, 10 classes) from Debian's
``dataset-fashion-mnist`` package, drawn per class and written as PNG files, one sub-folder per class name: the
layout `snnet quickstart DIR` takes.

    python benchmarks/fashion_mnist.py --classes 0-4 --per-class 500 --seed 1 --out data/fashion04

Classes by index: 0 t-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag,
9 ankle-boot. The photos are drawn from the package's training and test files together (7,000 per class); --seed
picks which. Without the package: one line saying how to install it, exit 1.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from snnet.utils.errors import UsageError
from snnet.utils.fileio import replaceable_image_folder

ROOT = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FILES = (("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))


def _idx(path: Path) -> np.ndarray:
    """An idx file (gzip): its magic number's last byte is the number of dimensions, then one big-endian uint32
    per dimension, then the uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(root: Path = ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28, labels N) of the training and test files together; SystemExit with one line naming the
    package when they are absent."""
    missing = [root / f for pair in FILES for f in pair if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"error: {missing[0]} not found: Fashion-MNIST comes from Debian's {PACKAGE} package; "
                         f"install it with `apt-get install {PACKAGE}`")
    parts = [(_idx(root / im), _idx(root / lb)) for im, lb in FILES]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def parse_classes(text: str) -> list[int]:
    """'0-4', '5,7,9' or '0-2,8' as class indices (sorted, each once); ValueError naming the bad part."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"--classes {text!r}: {part!r} is not an index or a range such as 0-4")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b <= 9:
            raise ValueError(f"--classes {text!r}: {part!r} is outside the classes 0-9")
        out.update(range(a, b + 1))
    return sorted(out)


def write(out: Path, classes: list[int], per_class: int, seed: int = 0, root: Path = ROOT) -> Path:
    """`per_class` photos of each class, drawn with `seed`, as out/<class name>/<index>.png (grayscale 28x28; the
    index is the photo's position in the training file followed by the test file). Written beside `out` first,
    then renamed over it."""
    images, labels = load(root)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for k in classes:
        pool = np.flatnonzero(labels == k)
        if per_class > len(pool):
            raise SystemExit(f"error: --per-class {per_class} is more than class {k}'s {len(pool)} photos; "
                             f"ask for at most {len(pool)}")
        folder = tmp / NAMES[k]
        folder.mkdir(parents=True)
        for i in np.sort(rng.choice(pool, per_class, replace=False)):
            Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="0-4", help="class indices: a range 0-4, a list 5,7,9, or both (default 0-4)")
    p.add_argument("--per-class", type=int, default=500, help="photos per class (default 500)")
    p.add_argument("--seed", type=int, default=0, help="which photos are drawn (default 0)")
    p.add_argument("--out", required=True, help="the image folder to write (an earlier one of this script's is "
                                                "replaced; a folder holding anything else is refused)")
    p.add_argument("--root", default=str(ROOT), help=f"the package's files (default {ROOT})")
    a = p.parse_args(argv)
    try:
        classes = parse_classes(a.classes)
    except ValueError as e:
        p.error(str(e))
    if a.per_class < 1:
        p.error(f"--per-class {a.per_class}: give at least 1")
    try:
        replaceable_image_folder(a.out, NAMES)
    except UsageError as e:
        raise SystemExit(f"error: --out {e}") from None
    out = write(Path(a.out), classes, a.per_class, a.seed, Path(a.root))
    print(f"wrote {out}: {len(classes)} classes ({', '.join(NAMES[k] for k in classes)}), {a.per_class} photos each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
