"""An image folder (one sub-folder per class) as a
:class:`~bract.data.tabular.FederatedDataset`.

Layout: ``root/<class name>/[<patient>/<any sub-folders>/]<image>``. Class names
are the sorted names of ``root``'s sub-folders (hidden ones, starting with ``.``,
are skipped); label ``i`` is the ``i``-th name. Each image's patient is its DICOM
``PatientID`` where its header has one, else the first folder below its class folder
(or the file itself, directly in its class folder): :func:`patient_units`. Each
patient is held out or not by its own id (:mod:`bract.data.holdout`). Images are PNG
or JPEG (read with Pillow) or DICOM ``.dcm`` (read with pydicom, the optional extra
``pip install 'bract[dicom]'``). Other files (``Thumbs.db``, ``.DS_Store``, notes)
are ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bract.data.errors import DataError, os_error_words, private_details
from bract.data.holdout import check_test_fraction, split_by_identity
from bract.data.image_arrays import (
    check_image_size,
    resize_images,
    subset_indices,
    to_channels,
    to_unit_float,
)
from bract.data.tabular import FederatedDataset

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "UNKNOWN_PATIENT_UNIT",
    "check_patients_known",
    "find_images",
    "load_image_folder",
    "patient_units",
    "read_dicom",
    "read_image",
]

#: File name endings read with Pillow (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: File name endings read with pydicom (case-insensitive).
DICOM_EXTENSIONS: tuple[str, ...] = (".dcm", ".dicom")

_DICOM_HINT = "pip install 'bract[dicom]'"

# What leaves a hospital instead of a message that names its files, folders or counts
# (DataError.public_reason): the whole message stays in the hospital's own log.
_PUBLIC_UNREADABLE = ("an image in the hospital's image folder cannot be read "
                      "(details in its own log)")
_PUBLIC_NO_PYDICOM = (f"the hospital's image folder holds DICOM files, and reading them needs "
                      f"pydicom: {_DICOM_HINT} (details in its own log)")


def find_images(root: str | Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """The image files under ``root``, their int64 labels and the class names.

    Files are listed in a fixed order (by class, then by path), so the result
    depends only on the folder's contents. Raises :class:`DataError` when
    ``root`` does not exist or is not a folder, has fewer than 2 class
    sub-folders, or a class folder holds no image; and when the folder, or any folder
    or file in it, cannot be listed or examined (permission denied, an I/O error): a
    folder it cannot read is never skipped, so no patient's images go missing
    silently. Each error carries a ``public_reason`` without a path.
    """
    root = Path(root).expanduser()
    try:
        return _find_images(root)
    except OSError as exc:
        raise DataError(
            f"cannot read the image folder {root}: {exc}; let the user bract runs as list "
            "and read every folder and image in it",
            public_reason=f"the hospital's image folder cannot be read ({os_error_words(exc)}; "
                          "details in its own log)",
        ) from None


def _files_under(folder: Path) -> Iterator[Path]:
    """Every file under ``folder`` (directory symlinks are not followed, hidden folders
    are not entered: their files are ignored anyway). A folder that cannot be listed
    raises its ``OSError``; it is never skipped."""
    def fail(exc: OSError) -> None:
        raise exc

    for parent, folders, names in os.walk(folder, onerror=fail):
        folders[:] = [f for f in folders if not f.startswith(".")]
        for name in names:
            yield Path(parent) / name


def _find_images(root: Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    if not root.exists():
        raise DataError(
            f"image folder not found: {root}. Give a folder with one sub-folder per class "
            "(e.g. root/normal/*.png, root/pneumonia/*.png); bract never downloads data.",
            public_reason="the hospital's image folder was not found (details in its own log)",
        )
    if not root.is_dir():
        raise DataError(f"{root} is a file; give a folder with one sub-folder per class",
                        public_reason="the hospital's image folder is a file, not a folder "
                                      "(details in its own log)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{root} has {len(classes)} class sub-folder(s) ({classes}); an image folder needs "
            "one sub-folder per class and at least 2 classes",
            public_reason="the hospital's image folder has fewer than 2 class sub-folders "
                          "(details in its own log)",
        )
    suffixes = IMAGE_EXTENSIONS + DICOM_EXTENSIONS
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in _files_under(root / name)
            if p.suffix.lower() in suffixes
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        )
        if not found:
            raise DataError(
                f"class folder {root / name} holds no image ({', '.join(suffixes)}); put its "
                "images there or remove the folder",
                public_reason="a class folder of the hospital's image folder holds no image "
                              "(details in its own log)",
            )
        files.extend(found)
        labels.extend([label] * len(found))
    return files, np.asarray(labels, dtype=np.int64), tuple(classes)


def patient_units(files: Sequence[Path], root: str | Path) -> list[str]:
    """The privacy unit (patient) of each image file under ``root``.

    * A DICOM file whose header has a ``PatientID`` belongs to ``dicom:<PatientID>``,
      wherever it lies: one patient's studies in several folders
      (``root/covid/<study>/<series>/*.dcm``, a PACS export), or under several
      classes, are one unit.
    * Any other file (PNG, JPEG, DICOM without a ``PatientID``) in a sub-folder of its
      class folder belongs to its **patient folder**, the first folder below the class
      folder (``root/covid/patient7/study1/c.png``: ``folder:patient7``); the same
      folder name under two classes is one patient.
    * Any other file directly in its class folder is a patient of its own
      (``file:<class>/<name>``).

    Guarantee: a file's unit is a function of its own path and header only (adding or
    removing another file never changes it; it can only make the folder refused).
    Raises :class:`DataError`, naming two of the files, only where one person could
    become two units: a patient folder name (under any class) that holds both DICOM
    files with a ``PatientID`` and files without one (the first would be
    ``dicom:<PatientID>``, the others ``folder:<name>``).
    """
    top = Path(root).expanduser()
    units: list[str] = []
    with_id: dict[str, Path] = {}  # patient folder name -> its first DICOM with a PatientID
    without_id: dict[str, Path] = {}  # patient folder name -> its first other file
    for path in files:
        parts = path.relative_to(top).parts  # (class, [patient folder, ...,] file)
        pid = _dicom_patient_id(path) if path.suffix.lower() in DICOM_EXTENSIONS else ""
        folder = parts[1] if len(parts) > 2 else None
        if pid:
            unit = f"dicom:{pid}"
        elif folder is not None:
            unit = f"folder:{folder}"
        else:
            unit = f"file:{'/'.join(parts)}"
        units.append(unit)
        if folder is not None:
            (with_id if pid else without_id).setdefault(folder, path)
    for folder, dicom in with_id.items():
        if folder in without_id:
            raise DataError(
                f"{dicom} carries a DICOM PatientID and {without_id[folder]} does not, but "
                f"both lie in patient folder {folder!r}, so one person could count as two "
                f"patients (the PatientID's and folder:{folder}); write the PatientID into "
                "the files without one, remove them, or move them to a folder of their own "
                "if they are another person's",
                public_reason="the hospital's image folder mixes DICOM files with a "
                              "PatientID and files without one in one patient folder "
                              "(details in its own log)")
    return units


#: The start of the unit of a file directly in its class folder with no DICOM
#: ``PatientID`` (:func:`patient_units`): the file is its own unit, its patient unknown.
UNKNOWN_PATIENT_UNIT = "file:"


def check_patients_known(units: Sequence[object], root: str | Path) -> None:
    """Refuse an image folder's units for patient-level privacy when any image's patient
    is unknown.

    A file directly in its class folder without a DICOM ``PatientID`` is a unit of its
    own (:func:`patient_units`): under the patient privacy unit it would count as one
    patient, and a patient with k such images would be protected only as k records
    (about k times the reported epsilon). Guarantee: raises :class:`DataError` when any
    of ``units`` (the ``patient_id`` column of :func:`load_image_folder` for ``root``)
    is such a file; the message counts them, names one and says how to fix the folder;
    its ``public_reason`` names no path and no count. Record-level privacy never needs
    this check.
    """
    loose = sorted({str(u) for u in units if str(u).startswith(UNKNOWN_PATIENT_UNIT)})
    if loose:
        raise DataError(
            f"{root}: {len(loose)} image(s) lie directly in their class folder with no "
            f"DICOM PatientID (e.g. {loose[0][len(UNKNOWN_PATIENT_UNIT):]}), so their "
            "patient is unknown and the patient privacy unit cannot protect their "
            "patients: put each patient's images in a sub-folder of their own "
            "(root/<class>/<patient>/<image>) or use DICOM files with a PatientID",
            public_reason="the hospital's image folder holds images whose patient is "
                          "unknown (directly in their class folder, no DICOM PatientID), "
                          "and its policy protects patients (details in its own log)")


def _pydicom(path: Path) -> Any:
    """pydicom, or a :class:`DataError` naming the DICOM file that needs it."""
    try:
        import pydicom
    except ImportError:
        raise DataError(
            f"{path} is a DICOM file and reading DICOM needs pydicom: {_DICOM_HINT}",
            public_reason=_PUBLIC_NO_PYDICOM,
        ) from None
    return pydicom


def _dicom_patient_id(path: Path) -> str:
    """The ``PatientID`` in ``path``'s DICOM header, stripped ("" when it has none)."""
    pydicom = _pydicom(path)
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types for bad files
        raise DataError(f"cannot read the DICOM header of {path} ({type(exc).__name__}: "
                        f"{exc}); replace or remove the file",
                        public_reason=_PUBLIC_UNREADABLE) from None
    return str(getattr(header, "PatientID", "") or "").strip()


def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """One PNG/JPEG (Pillow) or DICOM (pydicom) image as ``float32`` ``[channels, H, W]``
    in ``[0, 1]``.

    8-bit images are divided by 255, 16-bit ones by 65535; 32-bit integer and
    float images are min-max scaled. Colour becomes grey with the BT.601 luma
    weights when ``channels=1``. Raises :class:`DataError` naming the file when
    it cannot be read as an image.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return read_dicom(path, channels)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                pixels = np.asarray(img)
                if img.mode.startswith("I;16"):
                    pixels = pixels.astype(np.uint16)
            else:
                pixels = np.asarray(img.convert("RGB" if channels == 3 else "L"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or remove the file",
            public_reason=_PUBLIC_UNREADABLE,
        ) from None
    with private_details(_PUBLIC_UNREADABLE):  # their messages name the file
        unit = to_unit_float(pixels, where=str(path))
        return to_channels(unit[None], channels, where=str(path))[0]


def read_dicom(path: str | Path, channels: int = 1) -> np.ndarray:
    """One single-frame DICOM image as ``float32`` ``[channels, H, W]`` in ``[0, 1]``.

    The modality LUT (rescale slope and intercept) is applied, then the image is
    min-max scaled to ``[0, 1]`` (DICOM bit depths and windows vary between
    devices, so only the image's own range is meaningful); ``MONOCHROME1``
    (where bright means low values) is inverted so that bright is always high.
    Needs pydicom: without it the :class:`DataError` says ``pip install
    'bract[dicom]'``. Multi-frame files and files without pixel data are errors.
    """
    path = Path(path)
    pydicom = _pydicom(path)
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut  # type: ignore[no-redef]
    try:
        ds = pydicom.dcmread(path)
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise DataError(
                f"{path} holds {ds.NumberOfFrames} frames; bract reads single-frame DICOM "
                "images only (export one frame per file)",
                public_reason=_PUBLIC_UNREADABLE,
            )
        pixels = ds.pixel_array
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        if samples == 1:
            pixels = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
        photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types for bad or unsupported files
        raise DataError(
            f"cannot read DICOM image {path} ({type(exc).__name__}: {exc}); it may lack pixel "
            "data or use a compression pydicom cannot decode here; replace or remove the file",
            public_reason=_PUBLIC_UNREADABLE,
        ) from None
    pixels = np.asarray(pixels)
    if pixels.ndim != (2 if samples == 1 else 3):
        raise DataError(f"{path}: expected a 2-D image, got pixel data of shape {pixels.shape}",
                        public_reason=_PUBLIC_UNREADABLE)
    with private_details(_PUBLIC_UNREADABLE):  # the helpers' messages name the file
        if samples == 1:
            if not np.isfinite(pixels).all():
                raise DataError(f"{path}: pixels contain NaN or infinity",
                                public_reason=_PUBLIC_UNREADABLE)
            lo, hi = float(pixels.min()), float(pixels.max())
            span = hi - lo if hi > lo else 1.0
            unit = ((pixels - lo) / span).astype(np.float32)
        else:
            unit = to_unit_float(pixels, where=str(path))
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return to_channels(unit[None], channels, where=str(path))[0]


def load_image_folder(
    root: str | Path,
    image_size: int = 28,
    *,
    channels: int = 1,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_samples: int | None = None,
    progress: bool = False,
    name: str | None = None,
    strict: bool = False,
    split_key: bytes | str = b"",
) -> FederatedDataset:
    """Load an image folder (one sub-folder per class) and split it into training
    and central test sets.

    Every image is read with :func:`read_image` (grey by default, ``channels=3``
    for RGB), resized to ``image_size`` x ``image_size`` (bilinear, antialiased;
    the aspect ratio is not kept) and returned as ``float32`` ``[C, H, W]`` in
    ``[0, 1]``. ``image_size`` must be a multiple of 4 (bract's CNN pools twice
    by 2). ``n_samples`` (a simulation's subset; never applied to a hospital's own
    folder) first draws that many files (stratified, seeded by ``seed``, the only use
    of ``seed``). ``progress`` shows a rich progress bar while reading.

    The held-out split: each image's patient (:func:`patient_units`) is held out or
    not by :func:`bract.data.holdout.held_out_mask` of its id, ``test_fraction`` and
    the hospital's own ``split_key`` (optional), so all of a patient's images lie on
    one side, a file directly in its class folder is decided by its own path
    relative to ``root``, and adding or removing one image (one patient) moves no
    other image between training and held-out; neither ``seed`` nor anything else
    a coordinator sets enters it. Each class's held-out share is ``test_fraction``
    in expectation. A split that leaves either side empty is an error (add images).

    A file that cannot be read as one image (corrupt, an unsupported DICOM such as a
    multi-frame RT dose, no pixel data) is skipped, and one warning line counts the
    skipped files and names the first with its reason; ``strict=True`` raises on the
    first one instead. DICOM without pydicom is always an error (it would skip them
    all).

    Each image's patient is in ``train_columns["patient_id"]`` (and
    ``test_columns``), for patient-level DP.

    Guarantees: nothing is downloaded; the result depends only on the folder's
    contents and the arguments. Raises :class:`DataError` (a ``ValueError``)
    naming the problem and the file for a missing folder, missing classes, an
    empty class folder, a folder or file it may not list or examine (any ``OSError``:
    no folder is skipped), an unreadable image, DICOM without pydicom, a patient folder
    that mixes DICOM files with a ``PatientID`` and files without one, or an empty
    split. Each of those whose message names a path, a folder, a patient or a count
    carries a ``public_reason`` without it (what a hospital's failure reply sends).
    """
    check_image_size(image_size)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    check_test_fraction(test_fraction)
    files, labels, classes = find_images(root)
    if n_samples is not None:
        if n_samples < 2:
            raise DataError(f"n_samples must be >= 2 (one train, one test), got {n_samples}")
        if n_samples > len(files):
            raise DataError(
                f"{root} holds {len(files)} images; n_samples={n_samples} is too many",
                public_reason="the image folder holds fewer images than n_samples asks for "
                              "(details in its own log)",
            )
        keep = subset_indices(labels, n_samples, seed)
        files, labels = [files[i] for i in keep], labels[keep]
    images, ok = _read_all(files, channels, image_size, progress, strict)
    if not ok.all():
        files, labels, images = [f for f, k in zip(files, ok, strict=True) if k], \
            labels[ok], images[ok]
        missing = [c for i, c in enumerate(classes) if not (labels == i).any()]
        if missing or len(files) < 2:
            raise DataError(f"{root}: after skipping the unreadable files, class folder(s) "
                            f"{missing or list(classes)} hold too few readable images",
                            public_reason="a class folder of the hospital's image folder holds "
                                          "too few readable images (details in its own log)")
    top = Path(root).expanduser()
    patients = np.asarray(patient_units(files, top), dtype=object)
    train_idx, test_idx = split_by_identity(list(patients), test_fraction, key=split_key)
    for side, idx in (("training", train_idx), ("held-out", test_idx)):
        if not len(idx):
            raise DataError(
                f"{root}: the {side} split is empty: each of its {len(set(patients))} "
                f"patient(s) is held out with probability {test_fraction} by a hash of its "
                "own id, and none fell on that side; add images (patients)",
                public_reason=f"the hospital's image folder has too few patients for a "
                              f"{side} split (details in its own log)")
    return FederatedDataset(
        name=name or Path(root).expanduser().name or "imagefolder",
        x_train=np.ascontiguousarray(images[train_idx]),
        y_train=np.ascontiguousarray(labels[train_idx]),
        x_test=np.ascontiguousarray(images[test_idx]),
        y_test=np.ascontiguousarray(labels[test_idx]),
        num_classes=len(classes),
        input_shape=(channels, image_size, image_size),
        task="classification",
        class_names=classes,
        train_columns={"patient_id": patients[train_idx]},
        test_columns={"patient_id": patients[test_idx]},
    )


def _read_all(files: Sequence[Path], channels: int, image_size: int, progress: bool,
              strict: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Every file read and resized, and which ones could be read: an unreadable file
    is skipped (one warning line counts them) unless ``strict``."""
    out = np.empty((len(files), channels, image_size, image_size), dtype=np.float32)
    ok = np.ones(len(files), dtype=bool)
    skipped: list[str] = []

    def read(i: int) -> None:
        try:
            out[i] = resize_images(read_image(files[i], channels)[None], image_size)[0]
        except DataError as exc:
            if strict or _DICOM_HINT in str(exc):  # no pydicom: every DICOM would fail
                raise
            ok[i] = False
            skipped.append(str(exc))

    if not progress:
        for i in range(len(files)):
            read(i)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("reading images", total=len(files))
            for i in range(len(files)):
                read(i)
                bar.advance(task)
    if skipped:
        logging.getLogger("bract.data").warning(
            "skipped %d of %d files that cannot be read as one image (first: %s); pass "
            "--strict-data to stop at the first instead", len(skipped), len(files), skipped[0])
    return out, ok
