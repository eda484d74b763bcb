"""Array helpers shared by the image loaders: pixel scaling, channels, resizing,
and a deterministic stratified subset.

Every image a loader returns is ``float32`` ``[C, H, W]`` with values in ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from bract.data.errors import DataError

__all__ = [
    "LUMA_WEIGHTS",
    "check_image_size",
    "resize_images",
    "subset_indices",
    "to_channels",
    "to_unit_float",
]

#: ITU-R BT.601 luma weights (what Pillow's ``convert("L")`` uses) for RGB -> grey.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def check_image_size(image_size: int) -> None:
    """Raise :class:`DataError` unless ``image_size`` is a positive multiple of 4.

    bract's :class:`~bract.models.ChestCNN` pools twice by 2, so its input side must
    be a multiple of 4; checking at load time names the fix before any work is done.
    """
    valid = isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool)
    if not valid or image_size < 4 or image_size % 4:
        hint = max(4, int(image_size) // 4 * 4) if valid else 28
        raise DataError(
            f"image_size must be a positive multiple of 4 (the CNN pools twice by 2), got "
            f"{image_size!r}; use e.g. {hint}"
        )


def to_unit_float(pixels: np.ndarray, *, where: str) -> np.ndarray:
    """Scale integer or float pixels to ``float32`` in ``[0, 1]``.

    ``uint8`` is divided by 255 and ``uint16`` by 65535 (the full range of the
    type, so relative brightness between images is kept); other integer types
    and floats outside ``[0, 1]`` are min-max scaled per image (a constant image
    becomes all zeros). Non-finite values are an error naming ``where``.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) / np.float32(255.0)
    if pixels.dtype == np.uint16:
        return pixels.astype(np.float32) / np.float32(65535.0)
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    if not (np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)):
        raise DataError(f"{where}: pixels of type {pixels.dtype} are not numbers")
    arr = pixels.astype(np.float64)
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: pixels contain NaN or infinity")
    if np.issubdtype(pixels.dtype, np.floating) and arr.size and arr.min() >= 0 and arr.max() <= 1:
        return arr.astype(np.float32)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def to_channels(images: np.ndarray, channels: int, *, where: str) -> np.ndarray:
    """``[N, H, W]`` or ``[N, H, W, C]`` (C in 1, 3, 4) -> ``[N, channels, H, W]``.

    ``channels=1`` turns colour into grey with :data:`LUMA_WEIGHTS`; ``channels=3``
    repeats a grey channel three times. An alpha channel is dropped.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"{where}: expected images shaped [N, H, W] (grey) or [N, H, W, 3] (RGB), got "
            f"{list(images.shape)}"
        )
    if images.shape[-1] == 4:
        images = images[..., :3]
    if images.shape[-1] == 3 and channels == 1:
        images = (images @ LUMA_WEIGHTS)[..., None]
    elif images.shape[-1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).astype(np.float32))


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Resize ``[N, C, H, W]`` float images to ``[N, C, image_size, image_size]``.

    Bilinear with antialiasing (so downscaling averages instead of aliasing);
    values stay in ``[0, 1]``. Images already of that size are returned as they are.
    """
    if images.shape[-2:] == (image_size, image_size):
        return images
    import torch

    out = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(images)),
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return np.ascontiguousarray(out.clamp_(0.0, 1.0).numpy().astype(np.float32))


def subset_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted ``int64`` indices of a deterministic subset of exactly ``n`` samples,
    stratified by label when every class has at least 2 samples and fits."""
    total = len(labels)
    if n >= total:
        return np.arange(total, dtype=np.int64)
    if n < 1:
        raise DataError(f"a subset needs at least 1 sample, got n={n}")
    _, counts = np.unique(labels, return_counts=True)
    strat = labels if counts.min() >= 2 and len(counts) <= min(n, total - n) else None
    keep, _ = train_test_split(
        np.arange(total), train_size=n, random_state=seed, stratify=strat
    )
    return np.sort(keep).astype(np.int64)
