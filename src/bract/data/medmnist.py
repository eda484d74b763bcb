"""MedMNIST ``.npz`` files (PneumoniaMNIST, ChestMNIST, OCTMNIST, ...) as a
:class:`~bract.data.tabular.FederatedDataset`.

Nothing is downloaded: the user gives the path of a file they obtained from
MedMNIST (``pneumoniamnist.npz``, or a MedMNIST+ size such as
``pneumoniamnist_128.npz``). The file holds the official keys
``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images``, ``test_labels``; images are ``uint8`` ``[N, H, W]`` (grey) or
``[N, H, W, 3]`` (RGB), labels ``[N, 1]`` (one class per image) or ``[N, K]``
(multi-label 0/1 findings, as in ChestMNIST).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bract.data.errors import DataError, os_error_words, private_details
from bract.data.image_arrays import (
    check_image_size,
    resize_images,
    subset_indices,
    to_channels,
    to_unit_float,
)
from bract.data.tabular import FederatedDataset

__all__ = ["MEDMNIST_KEYS", "load_medmnist", "medmnist_labels"]

#: The keys of an official MedMNIST file (the ``val_*`` pair is optional here).
MEDMNIST_KEYS: tuple[str, ...] = (
    "train_images",
    "train_labels",
    "val_images",
    "val_labels",
    "test_images",
    "test_labels",
)
_REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")

# What leaves a hospital instead of a message that names its file or counts its images
# (DataError.public_reason): the whole message stays in the hospital's own log.
_PUBLIC_BAD_FILE = ("the hospital's data file is not a MedMNIST file bract can use "
                    "(details in its own log)")


def _public(what: str) -> str:
    return f"the hospital's data file {what} (details in its own log)"


#: Class names of the binary "any finding" policy for multi-label files.
ANY_FINDING_NAMES: tuple[str, str] = ("no finding", "any finding")


def medmnist_labels(
    labels: np.ndarray, label: str | int = "auto", *, where: str = "labels"
) -> np.ndarray:
    """Turn a MedMNIST label array into int64 class labels ``[N]`` under a policy.

    * one label column (``[N]`` or ``[N, 1]``): the labels themselves (``label``
      must be ``"auto"``);
    * several columns (multi-label, ``[N, K]`` of 0/1 findings, e.g. ChestMNIST's
      14 findings): ``"auto"`` or ``"any"`` gives 1 when the image has any
      finding and 0 when it has none ("no finding" vs "any finding"); an int
      ``k`` gives 1 when finding ``k`` is present, else 0.

    Raises :class:`DataError` for non-integer or negative labels, a multi-label
    column that is not 0/1, or a policy that does not fit the array.
    """
    arr = np.asarray(labels)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise DataError(f"{where}: expected labels shaped [N] or [N, K], got {list(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{where}: labels of type {arr.dtype} are not numbers")
    if arr.size and (not np.isfinite(arr).all() or np.any(arr != np.round(arr))):
        raise DataError(f"{where}: labels must be whole numbers (class indices or 0/1 findings)")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {int(arr.min())}")
    if arr.shape[1] == 1:
        if label != "auto":
            raise DataError(
                f"{where}: label={label!r} applies to multi-label files (several label "
                "columns, e.g. chestmnist); this file has one label per image: use label='auto'"
            )
        return np.ascontiguousarray(arr[:, 0])
    if arr.size and arr.max() > 1:
        raise DataError(
            f"{where}: {arr.shape[1]} label columns but values up to {int(arr.max())}; "
            "multi-label columns must be 0/1 findings"
        )
    if label in ("auto", "any"):
        return (arr.max(axis=1) if arr.size else np.zeros(len(arr), np.int64)).astype(np.int64)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
        if not 0 <= label < arr.shape[1]:
            raise DataError(
                f"{where}: label={label} is not a finding column; choose 0..{arr.shape[1] - 1}"
            )
        return np.ascontiguousarray(arr[:, int(label)])
    raise DataError(
        f"label must be 'auto', 'any' or a finding column index (int), got {label!r}"
    )


def _unreadable(path: Path, exc: OSError) -> DataError:
    """The error for a file the operating system would not let bract open or examine."""
    return DataError(
        f"cannot read {path}: {exc}; let the user bract runs as read the file (and list "
        "its folders)",
        public_reason=_public(f"cannot be read ({os_error_words(exc)})"),
    )


def _read_npz(path: Path) -> Mapping[str, np.ndarray]:
    """The file's arrays; :class:`DataError` with a ``public_reason`` without the path
    for any file that is missing, a folder, unreadable (any ``OSError``) or not a
    MedMNIST ``.npz``."""
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a folder on its path it may not search
        raise _unreadable(path, exc) from None
    if not exists:
        raise DataError(
            f"MedMNIST file not found: {path}. Give the path of a MedMNIST .npz file "
            "(e.g. pneumoniamnist.npz); bract never downloads data.",
            public_reason=_public("was not found"),
        )
    if is_dir:
        raise DataError(f"{path} is a directory; give the path of a MedMNIST .npz file",
                        public_reason=_public("is a folder, not a .npz file"))
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            missing = [k for k in _REQUIRED if k not in keys]
            if missing:
                raise DataError(
                    f"{path} is missing the key(s) {missing}; a MedMNIST file holds "
                    f"{list(MEDMNIST_KEYS)} (found {sorted(keys)})",
                    public_reason=_PUBLIC_BAD_FILE,
                )
            if ("val_images" in keys) != ("val_labels" in keys):
                raise DataError(f"{path} has only one of val_images / val_labels; give both",
                                public_reason=_PUBLIC_BAD_FILE)
            return {k: npz[k] for k in MEDMNIST_KEYS if k in keys}
    except DataError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the operating system's error (access, I/O), not the bytes'
            raise _unreadable(path, exc) from None
        raise _not_npz(path, exc) from None
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise _not_npz(path, exc) from None


def _not_npz(path: Path, exc: Exception) -> DataError:
    return DataError(
        f"cannot read {path} as a .npz file ({type(exc).__name__}: {exc}); is it a "
        "MedMNIST file, and complete?",
        public_reason=_public("cannot be read as a .npz file"),
    )


def _split_arrays(
    raw: Mapping[str, np.ndarray], split: str, label: str | int, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(
            f"{path}: {split}_images must be [N, H, W] (grey) or [N, H, W, 3] (RGB), got "
            f"{list(images.shape)}",
            public_reason=_PUBLIC_BAD_FILE,
        )
    with private_details(_public("holds labels bract cannot use")):  # where names the file
        y = medmnist_labels(labels, label, where=f"{path}: {split}_labels")
    if len(y) != len(images):
        raise DataError(
            f"{path}: {split}_images has {len(images)} images but {split}_labels has "
            f"{len(y)} labels; they must match one to one",
            public_reason=_public("holds images and labels that do not match one to one"),
        )
    return images, y


def load_medmnist(
    path: str | Path,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    label: str | int = "auto",
    include_val: bool = True,
    n_samples: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> FederatedDataset:
    """Load a MedMNIST ``.npz`` file: training split to partition, central test split.

    * Training split: ``train`` plus ``val`` (``include_val=True``, the default:
      a federation has no use for a separate validation set); test split: ``test``.
    * Images: ``float32`` ``[C, H, W]`` in ``[0, 1]`` (``uint8 / 255``). ``channels``
      ``None`` keeps the file's (1 grey, 3 RGB); 1 turns RGB into grey (BT.601 luma),
      3 repeats grey. ``image_size`` ``None`` keeps the file's side (28, 64, 128 or
      224 for MedMNIST); otherwise images are resized (bilinear, antialiased).
      The side must be a multiple of 4 (bract's CNN pools twice by 2).
    * Labels: see :func:`medmnist_labels` for the policy (``label``): one class
      per image as in the file; multi-label files (ChestMNIST) become binary
      "no finding" (0) vs "any finding" (1) unless ``label=k`` picks finding ``k``.
      ``num_classes`` is the largest label in the file plus one (at least 2).
    * ``n_samples``: use only that many images in total, drawn deterministically
      (stratified when possible) from training and test splits in the file's
      proportions (each at least 1).

    Guarantees: nothing is downloaded; the result depends only on the file and
    the arguments. Raises :class:`DataError` (a ``ValueError``) naming the
    problem for a missing or unreadable file, a missing key, images and labels
    that do not match, a bad label policy or an image size that is not a
    multiple of 4; each of those whose message names the file or counts its images
    carries a ``public_reason`` without them (what a hospital's failure reply sends).
    """
    path = Path(path).expanduser()
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be None (as in the file), 1 or 3, got {channels!r}")
    if image_size is not None:
        check_image_size(image_size)
    raw = _read_npz(path)
    x_tr, y_tr = _split_arrays(raw, "train", label, path)
    x_te, y_te = _split_arrays(raw, "test", label, path)
    if include_val and "val_images" in raw:
        x_va, y_va = _split_arrays(raw, "val", label, path)
        if x_va.shape[1:] != x_tr.shape[1:]:
            raise DataError(
                f"{path}: val_images are {list(x_va.shape[1:])} but train_images are "
                f"{list(x_tr.shape[1:])}; every split must hold images of one shape",
                public_reason=_public("holds splits of different image shapes"),
            )
        x_tr, y_tr = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    if x_te.shape[1:] != x_tr.shape[1:]:
        raise DataError(
            f"{path}: test_images are {list(x_te.shape[1:])} but train_images are "
            f"{list(x_tr.shape[1:])}; every split must hold images of one shape",
            public_reason=_public("holds splits of different image shapes"),
        )
    if len(y_tr) == 0 or len(y_te) == 0:
        raise DataError(f"{path}: the training and test splits must both hold images",
                        public_reason=_public("has an empty training or test split"))
    height, width = x_tr.shape[1:3]
    if image_size is None:
        if height != width:
            raise DataError(
                f"{path}: images are {height}x{width}, not square; give image_size to resize",
                public_reason=_public("holds images that are not square (give image-size)"),
            )
        try:
            check_image_size(int(height))
        except DataError:
            raise DataError(
                f"{path}: images are {height}x{width}; bract's CNN needs a side that is a "
                f"multiple of 4: give image_size (e.g. {max(4, height // 4 * 4)}) to resize",
                public_reason=_public("holds images whose side is not a multiple of 4 (give "
                                      "image-size)"),
            ) from None
        image_size = int(height)

    n_all = len(y_tr) + len(y_te)
    if n_samples is not None:
        if n_samples < 2:
            raise DataError(f"n_samples must be >= 2 (one train, one test), got {n_samples}")
        if n_samples > n_all:
            raise DataError(f"{path} holds {n_all} images; n_samples={n_samples} is too many",
                            public_reason=_public("holds fewer images than n_samples asks for"))
        n_te = min(max(1, round(n_samples * len(y_te) / n_all)), n_samples - 1)
        keep_tr = subset_indices(y_tr, n_samples - n_te, seed)
        keep_te = subset_indices(y_te, n_te, seed)
        x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]

    native_channels = 3 if x_tr.ndim == 4 and x_tr.shape[-1] == 3 else 1
    want = native_channels if channels is None else channels

    def convert(images: np.ndarray, split: str) -> np.ndarray:
        with private_details(_public("holds images bract cannot read")):  # where names it
            unit = to_unit_float(images, where=f"{path}: {split}_images")
            unit = to_channels(unit, want, where=f"{path}: {split}")
        return resize_images(unit, image_size)

    multi_label = raw["train_labels"].ndim == 2 and raw["train_labels"].shape[1] > 1
    num_classes = max(2, int(max(y_tr.max(), y_te.max())) + 1)
    class_names: tuple[str, ...] = ()
    if multi_label:
        class_names = (
            ANY_FINDING_NAMES if label in ("auto", "any") else ("absent", f"finding {label}")
        )
    ds_name = name or path.name.removesuffix(".npz")
    return FederatedDataset(
        name=ds_name,
        x_train=convert(x_tr, "train"),
        y_train=np.ascontiguousarray(y_tr),
        x_test=convert(x_te, "test"),
        y_test=np.ascontiguousarray(y_te),
        num_classes=num_classes,
        input_shape=(want, image_size, image_size),
        task="classification",
        class_names=class_names,
    )
