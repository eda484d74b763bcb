"""load_image_folder on tiny PNG / JPEG / DICOM folders written here."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bract.data import DataError, find_images, held_out_mask, load_image_folder, read_image
from bract.data.image_arrays import LUMA_WEIGHTS
from bract.data.imagefolder import patient_units

HAS_PYDICOM = importlib.util.find_spec("pydicom") is not None
needs_pydicom = pytest.mark.skipif(
    not HAS_PYDICOM, reason="pydicom is not installed (pip install 'bract[dicom]')"
)


def _png(path: Path, value: int, size: tuple[int, int] = (20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, dtype=np.uint8), mode="L").save(path)
    return path


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    """One PNG per image, each class a distinct grey level (class i: 40 + 60 i)."""
    for i, (name, count) in enumerate(sorted(per_class.items())):
        for k in range(count):
            _png(root / name / f"img{k:03d}.png", 40 + 60 * i)
    return root


def test_classes_from_sorted_folders_and_images_as_unit_floats(tmp_path) -> None:
    root = _folder(tmp_path / "xrays", {"pneumonia": 10, "normal": 10, "covid": 10})
    ds = load_image_folder(root, image_size=8, seed=1)
    assert ds.class_names == ("covid", "normal", "pneumonia")
    assert ds.num_classes == 3 and ds.name == "xrays"
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.n_train + ds.n_test == 30 and ds.n_train and ds.n_test
    expected = held_out_mask(
        [f"file:{c}/img{k:03d}.png" for c in ds.class_names for k in range(10)], 0.2)
    assert ds.n_test == int(expected.sum())  # each image decided by its own path
    # every image carries its class's grey level: labels follow the folders
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), (40 + 60 * y) / 255.0, atol=1e-5)


def test_jpeg_rgb_grey_by_default_and_rgb_on_request(tmp_path) -> None:
    root = tmp_path / "r"
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[..., 0], colour[..., 1], colour[..., 2] = 200, 100, 50
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(colour).save(root / cls / f"{k}.jpg", quality=100)
    grey = read_image(root / "a" / "0.jpg")
    assert grey.shape == (1, 8, 8)
    expected = float(np.array([200, 100, 50]) @ LUMA_WEIGHTS) / 255.0
    np.testing.assert_allclose(grey, expected, atol=3 / 255)  # JPEG rounding
    rgb = load_image_folder(root, 4, channels=3)
    assert rgb.input_shape == (3, 4, 4)
    np.testing.assert_allclose(
        rgb.x_train[:, :, 1, 1].mean(axis=0), [200 / 255, 100 / 255, 50 / 255], atol=3 / 255
    )


def test_sixteen_bit_png_uses_the_full_range(tmp_path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(path)
    np.testing.assert_allclose(read_image(path), 32768 / 65535, atol=1e-6)


def test_nested_folders_counted_and_other_files_ignored(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"a": 2, "b": 2})
    _png(root / "a" / "patient7" / "study1" / "x.PNG", 10)
    (root / "a" / "Thumbs.db").write_bytes(b"\x00")
    (root / "a" / "notes.txt").write_text("ignored")
    _png(root / "a" / ".hidden" / "y.png", 10)
    (root / ".git").mkdir()
    files, labels, classes = find_images(root)
    assert classes == ("a", "b")
    assert len(files) == 5 and labels.tolist() == [0, 0, 0, 1, 1]
    assert any(f.name == "x.PNG" for f in files)


def test_n_samples_draws_a_stratified_subset(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"a": 20, "b": 20})
    ds = load_image_folder(root, 4, n_samples=10)
    assert ds.n_train + ds.n_test == 10
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [5, 5]
    with pytest.raises(DataError, match=r"too many"):
        load_image_folder(root, 4, n_samples=41)


def test_missing_folder_or_a_file_instead(tmp_path) -> None:
    with pytest.raises(DataError, match=r"image folder not found.*never downloads"):
        load_image_folder(tmp_path / "nope", 8)
    f = _png(tmp_path / "one.png", 3)
    with pytest.raises(DataError, match=r"is a file"):
        load_image_folder(f, 8)


def test_fewer_than_two_classes(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"only": 3})
    with pytest.raises(DataError, match=r"1 class sub-folder.*at least 2 classes"):
        load_image_folder(root, 8)


def test_empty_class_folder_is_named(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"holds no image") as err:
        load_image_folder(root, 8)
    assert str(root / "c") in str(err.value)


def test_unreadable_image_is_named(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"a": 3, "b": 3})
    bad = root / "b" / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image") as err:
        load_image_folder(root, 8, strict=True)  # by default it is skipped and counted
    assert str(bad) in str(err.value)


def test_bad_size_or_channels(tmp_path) -> None:
    root = _folder(tmp_path / "r", {"a": 3, "b": 3})
    with pytest.raises(DataError, match=r"multiple of 4"):
        load_image_folder(root, 10)
    with pytest.raises(DataError, match=r"channels"):
        load_image_folder(root, 8, channels=2)


def _dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
           slope: float = 1.0, intercept: float = 0.0, frames: int = 1,
           patient: str = "") -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    if patient:
        ds.PatientID = patient
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@needs_pydicom
def test_dicom_min_max_scaled_and_monochrome1_inverted(tmp_path) -> None:
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) * 100 + 1000
    img = read_image(_dicom(tmp_path / "m2.dcm", ramp, slope=2.0, intercept=-1024))
    assert img.shape == (1, 4, 4) and img.dtype == np.float32
    np.testing.assert_allclose(img[0], (ramp - ramp.min()) / (ramp.max() - ramp.min()), atol=1e-6)
    inverted = read_image(_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1.0 - img, atol=1e-6)


@needs_pydicom
def test_dicom_folder_loads(tmp_path) -> None:
    root = tmp_path / "ct"
    for cls, level in (("lesion", 3000), ("normal", 500)):
        for k in range(3):
            px = np.full((8, 8), level, dtype=np.uint16)
            px[:4] += 100 * (k + 1)
            _dicom(root / cls / f"{k}.dcm", px)
    ds = load_image_folder(root, 4)
    assert ds.class_names == ("lesion", "normal")
    assert ds.input_shape == (1, 4, 4) and ds.n_train + ds.n_test == 6
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


@needs_pydicom
def test_multiframe_and_corrupt_dicom_are_errors(tmp_path) -> None:
    frames = _dicom(tmp_path / "mf.dcm", np.zeros((2, 4, 4)), frames=2)
    with pytest.raises(DataError, match=r"2 frames"):
        read_image(frames)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM? no")
    with pytest.raises(DataError, match=r"cannot read DICOM image") as err:
        read_image(bad)
    assert "bad.dcm" in str(err.value)


def test_dicom_without_pydicom_names_the_extra(tmp_path, monkeypatch) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 200)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(DataError, match=r"pip install 'bract\[dicom\]'"):
        read_image(path)


def test_each_image_names_its_patient_by_sub_folder_or_as_its_own(tmp_path) -> None:
    """root/class/patient/study/img: the first folder below the class is the patient
    (the same name under two classes is one patient); a file directly in its class
    folder is a patient of its own."""
    root = tmp_path / "xrays"
    for cls, level in (("covid", 40), ("normal", 100)):
        for p in range(3):
            for study in range(2):
                _png(root / cls / f"patient{p}" / f"study{study}" / "a.png", level + p)
        _png(root / cls / "loose.png", level)
    ds = load_image_folder(root, image_size=8, test_fraction=0.5)
    train, held = list(ds.train_columns["patient_id"]), list(ds.test_columns["patient_id"])
    assert len(train) == ds.n_train and len(held) == ds.n_test
    assert set(train) | set(held) == {"folder:patient0", "folder:patient1", "folder:patient2",
                                      "file:covid/loose.png", "file:normal/loose.png"}
    assert not set(train) & set(held)  # a patient's 4 images never straddle the split
    for p in range(3):
        assert (train + held).count(f"folder:patient{p}") == 4


def test_unreadable_files_are_skipped_and_counted_in_one_line(tmp_path, caplog) -> None:
    """A real export holds files bract cannot read as one image (a corrupt PNG here;
    a multi-frame RT dose in a PACS export): they are skipped and counted in one
    warning line; strict=True stops at the first, naming it."""
    import logging

    root = _folder(tmp_path / "xrays", {"normal": 5, "pneumonia": 5})
    (root / "normal" / "broken.png").write_bytes(b"not a png")
    (root / "pneumonia" / "notes.png").write_bytes(b"\x89PNG truncated")
    with caplog.at_level(logging.WARNING, logger="bract.data"):
        ds = load_image_folder(root, image_size=8)
    assert ds.n_train + ds.n_test == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "bract.data"]
    assert len(lines) == 1 and lines[0].startswith("skipped 2 of 12 files")
    assert "--strict-data" in lines[0]
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        load_image_folder(root, image_size=8, strict=True)


def test_a_class_left_without_readable_images_is_an_error(tmp_path) -> None:
    root = _folder(tmp_path / "xrays", {"normal": 5})
    (root / "pneumonia").mkdir()
    (root / "pneumonia" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"class folder\(s\) \['pneumonia'\] hold too few"):
        load_image_folder(root, image_size=8)


@needs_pydicom
def test_a_multi_frame_dicom_is_skipped_not_fatal(tmp_path, caplog) -> None:
    import logging

    root = tmp_path / "ct"
    for cls, level in (("lesion", 3000), ("normal", 500)):
        for k in range(3):
            _dicom(root / cls / f"{k}.dcm", np.full((8, 8), level + k, np.uint16))
    _dicom(root / "lesion" / "rtdose.dcm", np.zeros((15, 8, 8), np.uint16), frames=15)
    with caplog.at_level(logging.WARNING, logger="bract.data"):
        ds = load_image_folder(root, 4)
    assert ds.n_train + ds.n_test == 6
    assert "15 frames" in caplog.text


# --- the held-out split: each image (patient) decided by its own identity -------------

#: A record: (class, patient folder or None, index, PatientID): None writes a PNG, ""
#: a DICOM without a PatientID, "P0".. a DICOM with that PatientID.
_ID_KINDS = (None, "", "P0", "P1", "P2") if HAS_PYDICOM else (None,)
_CLASSES = st.sampled_from(("a", "b", "c"))
#: Folders p0, p1 hold files without a PatientID; s2, s3 (studies) DICOMs with one, so
#: a random folder is never refused for mixing them; the extra image may be anything.
_record = st.one_of(
    st.tuples(_CLASSES, st.sampled_from(("p0", "p1")), st.integers(0, 30),
              st.sampled_from(_ID_KINDS[:2])),
    st.tuples(_CLASSES, st.sampled_from(("s2", "s3")), st.integers(0, 30),
              st.sampled_from(_ID_KINDS[2:] or _ID_KINDS)),
    st.tuples(_CLASSES, st.none(), st.integers(0, 30), st.sampled_from(_ID_KINDS)))
_any_record = st.tuples(_CLASSES, st.sampled_from((None, "p0", "p1", "s2", "s3")),
                        st.integers(0, 30), st.sampled_from(_ID_KINDS))


def _path(record: tuple[str, str | None, int, str | None]) -> str:
    cls, folder, k, pid = record
    name = f"img{k}.{'png' if pid is None else 'dcm'}"
    return f"{cls}/{folder}/ser{k % 2}/{name}" if folder else f"{cls}/{name}"


def _write_folder(root: Path, paths: list[str],
                  ids: list[str | None] | None = None) -> None:
    """One 4x4 image per path whose first pixels encode its index (the record's tag):
    a PNG, or a DICOM (with ids[i] as its PatientID when not empty) whose pixels span
    0..255, so that its min-max scaling reads like the PNG's division by 255."""
    for i, rel in enumerate(paths):
        px = np.zeros((4, 4), np.uint8)
        px[0, 0], px[0, 1] = (i + 1) % 256, (i + 1) // 256
        px[3, 2] = 255
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".dcm"):
            _dicom(root / rel, px, patient=(ids[i] if ids else "") or "")
        else:
            Image.fromarray(px, mode="L").save(root / rel)


def _sides(root: Path, paths: list[str], seed: int, fraction: float) -> dict[str, bool]:
    """Each path's side (True: held out) when root is loaded with this seed."""
    ds = load_image_folder(root, 4, seed=seed, test_fraction=fraction)
    out = {}
    for x, held in ((ds.x_train, False), (ds.x_test, True)):
        tags = np.rint(x[:, 0, 0, 0] * 255).astype(int) + 256 * np.rint(x[:, 0, 0, 1] * 255)
        for tag in tags.astype(int):
            out[paths[tag - 1]] = held
    assert len(out) == len(paths)
    return out


@settings(max_examples=25, deadline=None)
@given(records=st.lists(_record, min_size=6, max_size=20, unique_by=_path), extra=_any_record,
       seeds=st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
       fraction=st.sampled_from((0.2, 0.5)))
def test_adding_one_image_moves_no_other_image_and_the_seed_moves_none(
        records, extra, seeds, fraction) -> None:
    """Property (the per-record epsilon of a hospital's own folder rests on it): for a
    random folder D (PNGs and DICOMs, with and without a PatientID, loose or in patient
    and study folders) and a random extra image x, every image of D is on the same side
    (training or held-out) in D and in D + x, whatever seed each load is given, or
    D + x is refused because x mixes a PatientID and none in one folder; the images of
    one patient (folder, or PatientID) are never separated."""
    paths = [_path(r) for r in records]
    assume(_path(extra) not in paths and len({r[0] for r in records}) >= 2)
    all_records = [*records, extra]
    all_paths = [*paths, _path(extra)]
    ids = [r[3] for r in all_records]
    with tempfile.TemporaryDirectory() as tmp:
        d, dx = Path(tmp) / "D", Path(tmp) / "Dx"
        _write_folder(d, paths, ids)
        _write_folder(dx, all_paths, ids)
        try:
            before = _sides(d, paths, seeds[0], fraction)
            again = _sides(d, paths, seeds[1], fraction)
        except DataError as exc:  # a tiny folder whose images all fell on one side
            assume("split is empty" not in str(exc))
            raise
        try:
            after = _sides(dx, all_paths, seeds[1], fraction)
        except DataError as exc:
            assume("split is empty" not in str(exc))
            # Only x can make the folder refused, naming x (D itself loads).
            assert "carries a DICOM PatientID and" in str(exc)
            assert str(dx / _path(extra)) in str(exc)
            event("D + x refused: x mixes a PatientID and none in one folder")
            after = None
    assert again == before
    if after is not None:
        assert {p: after[p] for p in paths} == before
    sides = after if after is not None else before
    units: dict[str, set[bool]] = {}
    for r, p in zip(all_records, all_paths, strict=True):
        if p in sides:
            unit = f"id:{r[3]}" if r[3] else (f"folder:{r[1]}" if r[1] else f"file:{p}")
            units.setdefault(unit, set()).add(sides[p])
    assert all(len(unit_sides) == 1 for unit_sides in units.values())


def test_a_hospitals_own_folder_is_split_the_same_whatever_the_coordinators_seed(
        tmp_path) -> None:
    """What a configured hospital runs (tasks.own_data under the run config's seed):
    the coordinator's seed does not move any image between training and held-out."""
    from bract import tasks
    from bract.flower.config import FederationConfig

    root = tmp_path / "xrays"
    _write_folder(root, [f"{c}/img{k}.png" for c in ("covid", "normal") for k in range(40)])
    got = []
    for seed in (0, 1, 7):
        task = FederationConfig.from_run_config({"dataset": "imagefolder", "num-classes": 2,
                                                 "in-channels": 1, "image-size": 4,
                                                 "seed": seed}).task()
        own = tasks.own_data(task, str(root))
        got.append((own.x_train, own.x_test))
    for x_train, x_test in got[1:]:
        np.testing.assert_array_equal(x_train, got[0][0])
        np.testing.assert_array_equal(x_test, got[0][1])


def test_a_split_with_an_empty_side_is_refused_without_figures_leaving(tmp_path) -> None:
    from bract.flower.client import failure_reason

    root = tmp_path / "r"
    _write_folder(root, ["a/img0.png", "b/img0.png"])
    units = ["file:a/img0.png", "file:b/img0.png"]
    for fraction, side in ((0.001, "held-out"), (0.999, "training")):
        assert held_out_mask(units, fraction).tolist() == [side == "training"] * 2
        with pytest.raises(DataError, match=rf"the {side} split is empty") as err:
            load_image_folder(root, 4, test_fraction=fraction)
        assert "\n" not in str(err.value) and "2 patient(s)" in str(err.value)
        assert failure_reason(err.value) == (  # what leaves the hospital: no count
            f"the hospital's image folder has too few patients for a {side} split "
            "(details in its own log)")


# --- one patient, one privacy unit ---------------------------------------------------

def _units_of(root: Path) -> dict[str, str]:
    """Each image's unit, by its path relative to root."""
    files, _, _ = find_images(root)
    return {f.relative_to(root).as_posix(): u
            for f, u in zip(files, patient_units(files, root), strict=True)}


@needs_pydicom
def test_a_pacs_export_with_one_patients_studies_in_several_folders_is_one_unit(
        tmp_path) -> None:
    """The usual PACS export, class/<study>/<series>/*.dcm: one PatientID across two
    study folders (and their series sub-folders, and another class) is one patient,
    loaded and held out together; another PatientID in the same study folder is
    another patient."""
    root = tmp_path / "ct"
    for study, series, k in (("study-A", "s1", 0), ("study-A", "s2", 1), ("study-B", "s1", 2),
                             ("study-B", "s3/echo2", 3)):
        _dicom(root / "lesion" / study / series / f"{k}.dcm",
               np.full((8, 8), 900 + k, np.uint16), patient="MRN-0042")
    _dicom(root / "normal" / "study-C" / "s1" / "4.dcm", np.full((8, 8), 50, np.uint16),
           patient="MRN-0042")
    _dicom(root / "lesion" / "study-A" / "s1" / "other.dcm", np.full((8, 8), 7, np.uint16),
           patient="MRN-0099")
    for k in range(12):
        _dicom(root / "normal" / f"study{k}" / "s1" / "x.dcm", np.full((8, 8), k, np.uint16),
               patient=f"MRN-1{k:03d}")
    units = _units_of(root)
    assert {rel for rel, u in units.items() if u == "dicom:MRN-0042"} == {
        "lesion/study-A/s1/0.dcm", "lesion/study-A/s2/1.dcm", "lesion/study-B/s1/2.dcm",
        "lesion/study-B/s3/echo2/3.dcm", "normal/study-C/s1/4.dcm"}
    assert units["lesion/study-A/s1/other.dcm"] == "dicom:MRN-0099"
    ds = load_image_folder(root, 4, test_fraction=0.5)
    train, held = list(ds.train_columns["patient_id"]), list(ds.test_columns["patient_id"])
    assert (train + held).count("dicom:MRN-0042") == 5
    assert ("dicom:MRN-0042" in train) != ("dicom:MRN-0042" in held)  # all 5 on one side
    assert not set(train) & set(held)


@needs_pydicom
def test_files_without_a_patient_id_belong_to_their_patient_folder(tmp_path) -> None:
    """A PNG export and a DICOM without a PatientID in one patient folder (at any
    depth, and the same folder name under another class) are one patient."""
    root = tmp_path / "xrays"
    study = root / "covid" / "patient7" / "study1"
    _dicom(study / "anon.dcm", np.full((8, 8), 800, np.uint16))
    _png(study / "c.png", 30, size=(8, 8))
    _png(root / "normal" / "patient7" / "d.png", 70, size=(8, 8))
    for k in range(12):
        _png(root / "normal" / f"other{k}" / "x.png", k, size=(8, 8))
    units = _units_of(root)
    assert [u for rel, u in units.items() if "patient7" in rel] == ["folder:patient7"] * 3
    ds = load_image_folder(root, 4, test_fraction=0.5)
    train, held = set(ds.train_columns["patient_id"]), set(ds.test_columns["patient_id"])
    assert "folder:patient7" in train ^ held and not train & held


@needs_pydicom
def test_two_patient_ids_in_one_folder_are_two_patients(tmp_path) -> None:
    root = tmp_path / "xrays"
    _dicom(root / "covid" / "study1" / "a.dcm", np.ones((8, 8)), patient="MRN-0042")
    _dicom(root / "covid" / "study1" / "s2" / "b.dcm", np.ones((8, 8)), patient="MRN-0099")
    _png(root / "normal" / "n.png", 3)
    assert _units_of(root) == {"covid/study1/a.dcm": "dicom:MRN-0042",
                               "covid/study1/s2/b.dcm": "dicom:MRN-0099",
                               "normal/n.png": "file:normal/n.png"}


@needs_pydicom
@pytest.mark.parametrize("second", ["covid/patient9/b.dcm", "normal/patient9/b.dcm",
                                    "normal/b.dcm"])
def test_one_patient_id_in_several_places_is_one_patient(tmp_path, second) -> None:
    """One PatientID in two folders (of any classes), or in a folder and directly in
    a class folder, is one patient."""
    root = tmp_path / "xrays"
    _dicom(root / "covid" / "patient7" / "a.dcm", np.ones((8, 8)), patient="MRN-0042")
    _dicom(root / second, np.ones((8, 8)), patient="MRN-0042")
    _png(root / "normal" / "n.png", 3)
    units = _units_of(root)
    assert units["covid/patient7/a.dcm"] == units[second] == "dicom:MRN-0042"


def _path_parts(path: Path, under: Path) -> list[str]:
    """The names a reply must not carry: every component of path below ``under``."""
    return [part for part in path.relative_to(under).parts if part]


@needs_pydicom
@pytest.mark.parametrize("other", ["covid/Jane_Doe_MRN0000/study1/export.png",
                                   "covid/Jane_Doe_MRN0000/anon.dcm",
                                   "normal/Jane_Doe_MRN0000/export.png"])
def test_a_patient_folder_mixing_dicoms_with_and_without_a_patient_id_is_refused(
        tmp_path, other) -> None:
    """A DICOM with a PatientID and a file without one under one patient folder name
    would make one person two units (dicom:<id> and folder:<name>): refused in one line
    naming both files; the reply names no file, folder or id."""
    from bract.flower.client import failure_reason

    root = tmp_path / "St_Elsewhere" / "xrays"
    dicom = _dicom(root / "covid" / "Jane_Doe_MRN0000" / "study1" / "a.dcm", np.ones((8, 8)),
                   patient="MRN-0042")
    if other.endswith(".png"):
        _png(root / other, 3)
    else:
        _dicom(root / other, np.ones((8, 8)))
    _png(root / "normal" / "n.png", 3)
    with pytest.raises(DataError, match=r"carries a DICOM PatientID and .* does not") as err:
        load_image_folder(root, 4)
    text = str(err.value)
    assert "\n" not in text and str(dicom) in text and str(root / other) in text
    reason = failure_reason(err.value)
    assert "mixes DICOM files with a PatientID and files without one" in reason
    for name in ["MRN-0042", *_path_parts(root / other, tmp_path), "a.dcm"]:
        assert name not in reason
    # Without the file lacking a PatientID, the folder loads.
    (root / other).unlink()
    assert _units_of(root)["covid/Jane_Doe_MRN0000/study1/a.dcm"] == "dicom:MRN-0042"


@needs_pydicom
def test_dicoms_directly_in_class_folders_are_patients_by_their_id(tmp_path) -> None:
    """Without patient folders, DICOM files with one PatientID (in any class) are one
    patient, a DICOM without one and a PNG are patients of their own."""
    root = tmp_path / "ct"
    for cls, level in (("lesion", 3000), ("normal", 500)):
        for k in range(4):
            _dicom(root / cls / f"{k}.dcm", np.full((8, 8), level + k, np.uint16),
                   patient=f"P{k % 2}")
    _dicom(root / "normal" / "anon.dcm", np.full((8, 8), 5, np.uint16))
    _png(root / "normal" / "n.png", 3)
    files, _, _ = find_images(root)
    assert sorted(set(patient_units(files, root))) == [
        "dicom:P0", "dicom:P1", "file:normal/anon.dcm", "file:normal/n.png"]


@needs_pydicom
def test_the_patient_unit_refuses_images_whose_patient_is_unknown(tmp_path) -> None:
    """Under the patient privacy unit a file directly in its class folder with no DICOM
    PatientID would count as a patient of its own (a patient with k such images then
    protected only as k records): check_patients_known refuses it, counting and naming
    such files in its message and neither in its public reason. Patient folders and
    DICOM files with a PatientID directly in a class folder pass."""
    from bract.data.imagefolder import check_patients_known

    root = tmp_path / "xrays"
    for cls in ("normal", "pneumonia"):
        for p in range(2):
            _png(root / cls / f"patient{p}" / "a.png", 40 + p)
        _dicom(root / cls / "x.dcm", np.full((8, 8), 7, np.uint16), patient="P1")
    files, _, _ = find_images(root)
    check_patients_known(patient_units(files, root), root)  # every patient known
    _png(root / "normal" / "loose.png", 3)
    _dicom(root / "pneumonia" / "anon.dcm", np.full((8, 8), 5, np.uint16))
    files, _, _ = find_images(root)
    with pytest.raises(DataError) as refused:
        check_patients_known(patient_units(files, root), root)
    message = " ".join(str(refused.value).split())
    assert message.startswith(f"{root}: 2 image(s) lie directly in their class folder with "
                              "no DICOM PatientID (e.g. normal/loose.png)")
    assert "put each patient's images in a sub-folder of their own" in message
    assert "DICOM files with a PatientID" in message
    public = refused.value.public_reason
    assert "2" not in public and "loose" not in public and str(tmp_path) not in public
    ds = load_image_folder(root, image_size=8, test_fraction=0.5)  # record level: unchanged
    assert {"file:normal/loose.png", "file:pneumonia/anon.dcm"} <= (
        set(ds.train_columns["patient_id"]) | set(ds.test_columns["patient_id"]))


# --- what a hospital's failure reply carries ------------------------------------------

def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _fails(case: str, root: Path, monkeypatch) -> tuple[DataError, Path]:
    """Make the image folder at root fail as ``case`` says: the error, and the deepest
    path its message names (a file or folder at or under root)."""
    for cls in ("covid", "normal"):
        for k in range(3):
            _png(root / cls / f"Pat_{cls}_{k}" / "x.png", 40 * k, size=(8, 8))
    patient = root / "covid" / "Jane_Doe_MRN0000"
    named = patient / "bad.dcm"
    if case == "corrupt png":
        named = _write_bytes(patient / "bad.png", b"not a png")
    elif case in ("corrupt dicom", "dicom header"):
        _write_bytes(named, b"DICM? no")
    elif case == "multi-frame dicom":
        _dicom(named, np.zeros((2, 4, 4)), frames=2, patient="MRN0000")
    elif case == "dicom without pydicom":
        _write_bytes(named, b"\x00" * 200)
        monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    elif case == "missing folder":
        named = root = root / "Jane_Doe_MRN0000"
    elif case == "a file, not a folder":
        named = root = _png(patient / "scan.png", 3)
    elif case == "one class":
        root = root.parent / "single"  # one class folder, named after a patient
        named = _png(root / "Jane_Doe_MRN0000" / "x.png", 3).parent
    elif case == "empty class":
        named = root / "Jane_Doe_MRN0000"
        named.mkdir()
        (named / "notes.txt").write_text("none")
    elif case == "no readable image in a class":
        named = root / "Jane_Doe_MRN0000"
        _write_bytes(named / "MRN0000" / "bad.png", b"junk")
    with pytest.raises(DataError) as err:
        if case == "dicom header":
            patient_units([named], root)
        else:
            load_image_folder(root, 4, strict=case != "no readable image in a class")
    return err.value, named


_FAILURES = ("corrupt png", "corrupt dicom", "dicom header", "multi-frame dicom",
             "dicom without pydicom", "missing folder", "a file, not a folder", "one class",
             "empty class", "no readable image in a class")


@pytest.mark.parametrize("case", _FAILURES)
def test_a_failure_reply_names_no_part_of_the_hospitals_data_root(
        tmp_path, monkeypatch, case) -> None:
    """A hospital's image folder that cannot be loaded: the message (its own log) names
    the file or folder, the reply (failure_reason, what reaches the coordinator) names
    no component of its path, neither the folders nor the patient's name."""
    from bract.flower.client import failure_reason

    if "dicom" in case and case != "dicom without pydicom" and not HAS_PYDICOM:
        pytest.skip("pydicom is not installed (pip install 'bract[dicom]')")
    root = tmp_path / "St_Elsewhere" / "xrays"
    exc, named = _fails(case, root, monkeypatch)
    assert str(named) in str(exc) or repr(named.name) in str(exc)
    reason = failure_reason(exc)
    assert reason == exc.public_reason and "details in its own log" in reason
    for part in named.parts[1:]:
        assert part not in reason, (part, reason)


def _deny(monkeypatch, how: str, target: Path) -> None:
    """Make the operating system refuse bract ``target`` (tests run as root, whom
    ``chmod`` does not stop): listing it, examining it, or listing it while walking."""
    import os

    def refused() -> PermissionError:
        return PermissionError(13, "Permission denied", str(target))

    if how == "list the folder":
        real_iterdir = Path.iterdir

        def iterdir(self):
            if self == target:
                raise refused()
            return real_iterdir(self)

        monkeypatch.setattr(Path, "iterdir", iterdir)
    elif how == "walk into a folder":
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == target:
                raise refused()
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    else:  # "examine it"
        real_stat = Path.stat

        def stat(self, *args, **kwargs):
            if self == target:
                raise refused()
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)


@pytest.mark.parametrize(("how", "where"), [
    ("list the folder", ""),
    ("examine it", ""),
    ("walk into a folder", "covid"),
    ("walk into a folder", "covid/Jane_Doe_MRN0000"),
    ("walk into a folder", "covid/Jane_Doe_MRN0000/study1"),
    ("examine it", "covid/Jane_Doe_MRN0000/x.png"),
])
def test_a_folder_or_file_bract_may_not_read_is_refused_never_skipped(
        tmp_path, monkeypatch, how, where) -> None:
    """The operating system refusing bract a folder or a file of the image folder
    (permission denied) stops the load with a DataError in one line naming the path
    and the refusal, never a PermissionError whose text (the path) would reach the
    coordinator, and never a folder skipped (one patient's images missing without a
    word): the reply says why in the OS's words and names no part of the path."""
    from bract.flower.client import failure_reason

    root = tmp_path / "St_Elsewhere" / "xrays"
    for cls in ("covid", "normal"):
        for k in range(3):
            _png(root / cls / f"Pat_{cls}_{k}" / "x.png", 40 * k, size=(8, 8))
    _png(root / "covid" / "Jane_Doe_MRN0000" / "x.png", 3, size=(8, 8))
    _png(root / "covid" / "Jane_Doe_MRN0000" / "study1" / "y.png", 3, size=(8, 8))
    assert len(find_images(root)[0]) == 8
    target = root / where if where else root
    _deny(monkeypatch, how, target)
    with pytest.raises(DataError) as err:
        load_image_folder(root, 4)
    text = str(err.value)
    assert "\n" not in text and str(root) in text and "Permission denied" in text
    reason = failure_reason(err.value)
    assert reason == err.value.public_reason == (
        "the hospital's image folder cannot be read (Permission denied; details in its own "
        "log)")
    for part in target.parts[1:]:
        assert part not in reason, (part, reason)
