"""Offline image data for the vision track, fetched only from package registries.

* Fashion-MNIST (Xiao et al. 2017; 60,000 train + 10,000 test 28x28 grayscale images, 10
  classes, MIT): the Debian package `dataset-fashion-mnist`, fetched by
  `moetx.datasets.registry` (`apt-get download` into `$MOETX_DATA/downloads`, no root install),
  whose four IDX files are copied out of it into `$MOETX_DATA/fashion_mnist/<version>`. The
  decoded files' SHA-256 are checked.
* scikit-learn's bundled digits (1,797 8x8 images, 10 classes, BSD): a fixed split of 1,500
  train / 297 test images.
* Digit clips: [T, 32, 32, 1] videos of a (2x upscaled) digit moving and bouncing off the frame
  edges, one clip per digit image, deterministic by split and index; the label is the digit.
* Digit captions: each digit paired with a short text ("the number seven", ...) as word ids,
  for the ALIGN-style dual encoder.

All arrays are uint8 images [N, H, W, 1] (clips [N, T, H, W, 1]) and int32 labels [N].
`python -m moetx.cli.data` fetches what needs fetching (the Makefile's `data` step).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from moetx.datasets import paths, registry
from moetx.datasets.registry import FetchError

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_VERSION = "0.0~git20200523.55506a9-1"
#: Only the pinned version: the IDX files' content is checked against fixed hashes.
FASHION_MNIST = registry.Package("apt", FASHION_MNIST_PACKAGE, FASHION_MNIST_VERSION,
                                 pattern=f"{FASHION_MNIST_PACKAGE}_*_all.deb",
                                 candidate_fallback=False)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# SHA-256 of the decompressed IDX files (the content, whatever the .gz compression).
_FASHION_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz",
                          "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz",
                          "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz",
                         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz",
                         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
_DEB_MEMBER_DIR = Path("usr/share/datasets/fashion-mnist")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS_TRAIN = 1500


def _log(message: str) -> None:
    print(f"[moetx.vision.data] {message}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def parse_idx(data: bytes) -> np.ndarray:
    """Decodes an IDX file (LeCun's MNIST format): 2 zero bytes, a dtype code, the number of
    dimensions, big-endian int32 sizes, then the row-major values."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise FetchError(f"Not an IDX file: header {data[:4].hex()} (expected 00 00 <dtype> "
                        f"<ndim> with dtype one of {[hex(k) for k in _IDX_DTYPES]}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(x) for x in np.frombuffer(data[4:header], ">i4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise FetchError(f"IDX payload is {len(data) - header} bytes but shape {shape} of "
                        f"{dtype} needs {expected}; the file is truncated or corrupt.")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------------- Fashion-MNIST
def fashion_mnist_dir(data_dir=None) -> Path:
    return paths.data_dir(data_dir) / "fashion_mnist" / FASHION_MNIST_VERSION


def fetch_fashion_mnist(data_dir=None, force: bool = False) -> Path:
    """Leaves the four IDX .gz files in `fashion_mnist_dir()`, copied out of the Debian package
    (fetched with `apt-get download` when not cached; `force` downloads it again).

    Raises FetchError with the fix when the package cannot be fetched or lacks a file."""
    out = fashion_mnist_dir(data_dir)
    if not force and all((out / name).exists() for name, _ in _FASHION_FILES.values()):
        return out
    deb = registry.fetch(FASHION_MNIST, data_dir, purpose="Fashion-MNIST (30.9 MB)",
                         refresh=force, manual=f"the four IDX .gz files into {out}")
    wanted = [str(_DEB_MEMBER_DIR / name) for name, _ in _FASHION_FILES.values()]
    members = registry.read_members(deb, wanted)
    out.mkdir(parents=True, exist_ok=True)
    for member in wanted:
        if member not in members:
            raise FetchError(f"{deb.name} has no {member}; delete it and re-run "
                             "`python -m moetx.cli.data --force`.")
        # Written under a temporary name and renamed: an interrupted copy leaves no half file.
        target = out / Path(member).name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(members[member])
        os.replace(tmp, target)
    _log(f"Fashion-MNIST ready in {out}")
    return out


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    directory = fetch_fashion_mnist(data_dir)
    arrays = []
    for kind in ("images", "labels"):
        name, sha = _FASHION_FILES[(split, kind)]
        raw = gzip.decompress((directory / name).read_bytes())
        if hashlib.sha256(raw).hexdigest() != sha:
            raise FetchError(f"{directory / name} does not decode to the expected content; "
                            f"delete {directory} and re-run `python -m moetx.cli.data`.")
        arrays.append(parse_idx(raw))
    images, labels = arrays
    return images[..., None], labels.astype(np.int32)


def load_fashion_mnist(split: str, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int32 [N]) of 'train' (60,000) or 'test' (10,000);
    fetches the package on first use."""
    return _load_fashion_mnist(split, None if data_dir is None else str(data_dir))


# ----------------------------------------------------------------------------- digits
@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # 0..16 intensities -> 0..255.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    order = np.random.RandomState(0).permutation(len(images))
    return images[order], d.target.astype(np.int32)[order]


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (images uint8 [N, 8, 8, 1], labels int32 [N]); 'train' is a fixed
    1,500 of the 1,797 images, 'test' the other 297."""
    images, labels = _all_digits()
    if split == "train":
        return images[:_DIGITS_TRAIN], labels[:_DIGITS_TRAIN]
    if split == "test":
        return images[_DIGITS_TRAIN:], labels[_DIGITS_TRAIN:]
    raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")


def digit_clips(split: str, num_frames: int = 8, size: int = 32, scale: int = 2
                ) -> tuple[np.ndarray, np.ndarray]:
    """Clips uint8 [N, num_frames, size, size, 1] of each digit of `split` (upscaled `scale`x)
    moving at a constant velocity and bouncing off the edges; labels are the digits. Clip i's
    start and velocity come from RandomState((split seed, i)), so clips are reproducible."""
    images, labels = load_digits(split)
    d = images.shape[1] * scale
    if d > size:
        raise ValueError(f"A {d}x{d} digit does not fit a {size}x{size} frame.")
    big = np.kron(images[..., 0], np.ones((scale, scale), np.uint8))
    clips = np.zeros((len(images), num_frames, size, size, 1), np.uint8)
    room = size - d
    split_seed = {"train": 1, "test": 2}[split]
    for i, digit in enumerate(big):
        rng = np.random.RandomState([split_seed, i])
        pos = rng.uniform(0, room, 2)
        vel = rng.uniform(1.0, 3.0, 2) * rng.choice([-1.0, 1.0], 2)
        for t in range(num_frames):
            y, x = (int(round(p)) for p in pos)
            clips[i, t, y:y + d, x:x + d, 0] = digit
            pos = pos + vel
            for k in range(2):  # Reflect at the walls.
                if pos[k] < 0:
                    pos[k], vel[k] = -pos[k], -vel[k]
                elif pos[k] > room:
                    pos[k], vel[k] = 2 * room - pos[k], -vel[k]
    return clips, labels


CAPTION_TEMPLATES = ("the number {}", "a handwritten {}", "digit {}", "an image of a {}")
#: Word vocabulary of the captions: id 0 is padding.
CAPTION_VOCAB = ("<pad>",) + tuple(sorted({w for t in CAPTION_TEMPLATES
                                           for w in t.format("").split()} | set(DIGIT_WORDS)))


def caption_tokens(text: str, length: int = 8) -> np.ndarray:
    """Word ids of `text` (words of `CAPTION_VOCAB`), zero-padded to `length`."""
    ids = []
    for w in text.split():
        if w not in CAPTION_VOCAB:
            raise ValueError(f"Word {w!r} is not in the caption vocabulary {CAPTION_VOCAB}.")
        ids.append(CAPTION_VOCAB.index(w))
    if len(ids) > length:
        raise ValueError(f"{text!r} has {len(ids)} words; the caption length is {length}.")
    return np.asarray(ids + [0] * (length - len(ids)), np.int32)


def digit_captions(split: str, length: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [N, 8, 8, 1], caption word ids int32 [N, length], labels [N]): digit i gets
    template i mod 4 filled with its digit's name."""
    images, labels = load_digits(split)
    text = np.stack([caption_tokens(CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(
        DIGIT_WORDS[y]), length) for i, y in enumerate(labels)])
    return images, text, labels
