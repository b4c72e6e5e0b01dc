"""The data `myext train` and the examples learn from: scikit-learn's bundled digits or MNIST.

Both come as :class:`ImageData`: images (N, 1, 28, 28) for the article's 784-input nets,
normalised with the training set's statistics, and int64 labels.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ImageData", "load_digits_dataset", "load_mnist_dataset", "read_idx"]


class ImageData(NamedTuple):
    """Images ``(N, 1, 28, 28)`` float32, normalised with the training set's mean and std,
    and labels ``(N,)`` int64, split into training and test sets."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32,
               0x0D: torch.float32, 0x0E: torch.float64}
_SPLIT_SEED = 0  # the digits' train/test split is the same whatever --seed is
_DIGITS_TEST_FRACTION = 0.2


def read_idx(path: os.PathLike | str) -> torch.Tensor:
    """Reads an IDX file (the format of the MNIST files), gzip-compressed or not.

    Args:
        path: the file.

    Returns:
        A tensor of the file's shape and element type (uint8 for MNIST).

    Raises:
        ValueError: if the file is not a well-formed IDX file.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = header + math.prod(shape) * itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX data of shape {shape} needs {expected} bytes, the file has {len(raw)}")
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize > 1 and sys.byteorder == "little":
        data = data.view(-1, itemsize).flip(1).contiguous()  # IDX is big-endian
    return data.view(dtype).reshape(shape)


def _find_idx(data_dir: Path, stem: str, dims: int) -> Path:
    # The usual names, and the dotted ones some mirrors use (train-images.idx3-ubyte).
    names = [f"{stem}-idx{dims}-ubyte", f"{stem}.idx{dims}-ubyte"]
    for name in names:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"no {names[0]}[.gz] in {data_dir}: --data mnist reads the four MNIST IDX files "
                       f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                       f"t10k-labels-idx1-ubyte, gzip-compressed or not) from --data-dir")


def _to_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W) pixels to (N, 1, 28, 28) float32 in [0, 1], resized bilinearly."""
    images = images.to(torch.float32).div(scale)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.shape[-2:] != (28, 28):
        images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    return images


def _normalised(name: str, train_x, train_y, test_x, test_y) -> ImageData:
    mean, std = train_x.mean(), train_x.std()
    return ImageData(name, (train_x - mean) / std, train_y, (test_x - mean) / std, test_y)


def load_digits_dataset() -> ImageData:
    """scikit-learn's bundled handwritten digits (1797 images, 8×8, no download), resized to
    28×28 and split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits need scikit-learn: pip install scikit-learn (or myext[train]); "
                          "or train on MNIST files with --data mnist --data-dir DIR") from None
    digits = load_digits()
    images = _to_images(torch.as_tensor(digits.images), scale=16.0)  # pixel values are 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    test_count = round(len(labels) * _DIGITS_TEST_FRACTION)
    test, train = order[:test_count], order[test_count:]
    return _normalised("digits (8x8 resized to 28x28)", images[train], labels[train], images[test], labels[test])


def load_mnist_dataset(data_dir: os.PathLike | str) -> ImageData:
    """MNIST from its four IDX files in ``data_dir``: the standard 60000/10000 split."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NotADirectoryError(f"--data-dir {data_dir} is not a directory")
    parts = [read_idx(_find_idx(data_dir, stem, dims)) for stem, dims in
             [("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1)]]
    train_x, train_y, test_x, test_y = parts
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(f"MNIST files in {data_dir}: expected images (N, H, W) and labels (N,), "
                               f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    return _normalised("MNIST", _to_images(train_x, 255.0), train_y.long(), _to_images(test_x, 255.0), test_y.long())
