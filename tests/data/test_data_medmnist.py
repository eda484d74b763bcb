"""load_medmnist on small .npz files written here in the official MedMNIST layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bract.data import DataError, load_medmnist, medmnist_labels
from bract.data.image_arrays import LUMA_WEIGHTS


def _write(
    path: Path,
    *,
    n: tuple[int, int, int] = (30, 6, 12),
    side: int = 28,
    rgb: bool = False,
    label_cols: int = 1,
    n_classes: int = 2,
    seed: int = 0,
    drop: tuple[str, ...] = (),
    **override: np.ndarray,
) -> Path:
    """An npz with the official keys: uint8 images, labels [N, label_cols]."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, side, side, 3) if rgb else (count, side, side)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if label_cols == 1:
            labels = (np.arange(count) % n_classes).reshape(-1, 1)
        else:
            labels = rng.integers(0, 2, size=(count, label_cols))
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    arrays.update(override)
    for key in drop:
        arrays.pop(key)
    np.savez(path, **arrays)
    return path


def test_grayscale_file_shapes_range_and_values(tmp_path) -> None:
    path = _write(tmp_path / "pneumoniamnist.npz")
    raw = np.load(path)
    ds = load_medmnist(path)
    assert ds.name == "pneumoniamnist"
    assert ds.input_shape == (1, 28, 28)
    assert ds.x_train.shape == (36, 1, 28, 28) and ds.x_test.shape == (12, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # train then val, pixel values / 255, labels as in the file
    np.testing.assert_allclose(ds.x_train[:30, 0], raw["train_images"] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ds.x_train[30:, 0], raw["val_images"] / 255.0, atol=1e-6)
    np.testing.assert_allclose(ds.x_test[:, 0], raw["test_images"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(
        ds.y_train, np.concatenate([raw["train_labels"][:, 0], raw["val_labels"][:, 0]])
    )
    assert ds.num_classes == 2 and ds.task == "classification"


def test_validation_split_can_be_left_out(tmp_path) -> None:
    path = _write(tmp_path / "a.npz")
    assert load_medmnist(path, include_val=False).n_train == 30
    # a file without val keys loads too
    no_val = _write(tmp_path / "b.npz", drop=("val_images", "val_labels"))
    assert load_medmnist(no_val).n_train == 30


def test_number_of_classes_is_the_largest_label_plus_one(tmp_path) -> None:
    ds = load_medmnist(_write(tmp_path / "octmnist.npz", n_classes=4))
    assert ds.num_classes == 4
    assert set(np.unique(ds.y_train)) == {0, 1, 2, 3}


def test_rgb_kept_or_turned_grey(tmp_path) -> None:
    path = _write(tmp_path / "dermamnist.npz", rgb=True)
    raw = np.load(path)["test_images"].astype(np.float64) / 255.0
    rgb = load_medmnist(path)
    assert rgb.input_shape == (3, 28, 28)
    np.testing.assert_allclose(rgb.x_test.transpose(0, 2, 3, 1), raw, atol=1e-6)
    grey = load_medmnist(path, channels=1)
    assert grey.input_shape == (1, 28, 28)
    np.testing.assert_allclose(grey.x_test[:, 0], raw @ LUMA_WEIGHTS, atol=1e-5)
    # grey files can be repeated to 3 channels
    three = load_medmnist(_write(tmp_path / "g.npz"), channels=3)
    assert three.input_shape == (3, 28, 28)
    np.testing.assert_array_equal(three.x_test[:, 0], three.x_test[:, 2])


def test_multilabel_any_finding_or_one_finding(tmp_path) -> None:
    path = _write(tmp_path / "chestmnist.npz", label_cols=14)
    raw = np.load(path)
    ds = load_medmnist(path)
    assert ds.num_classes == 2 and ds.class_names == ("no finding", "any finding")
    np.testing.assert_array_equal(ds.y_test, raw["test_labels"].max(axis=1))
    one = load_medmnist(path, label=3)
    np.testing.assert_array_equal(one.y_test, raw["test_labels"][:, 3])
    assert one.class_names == ("absent", "finding 3")
    np.testing.assert_array_equal(load_medmnist(path, label="any").y_test, ds.y_test)


def test_label_policy_errors() -> None:
    single = np.array([[0], [1], [2]])
    multi = np.array([[0, 1], [0, 0]])
    with pytest.raises(DataError, match=r"one label per image"):
        medmnist_labels(single, 0)
    with pytest.raises(DataError, match=r"choose 0..1"):
        medmnist_labels(multi, 5)
    with pytest.raises(DataError, match=r"label must be"):
        medmnist_labels(multi, "first")
    with pytest.raises(DataError, match=r"0/1 findings"):
        medmnist_labels(np.array([[0, 2], [1, 0]]))
    with pytest.raises(DataError, match=r">= 0"):
        medmnist_labels(np.array([[-1], [0]]))
    with pytest.raises(DataError, match=r"whole numbers"):
        medmnist_labels(np.array([[0.5], [1.0]]))
    np.testing.assert_array_equal(medmnist_labels(np.array([2.0, 1.0])), [2, 1])


def test_resize_to_image_size(tmp_path) -> None:
    flat = np.full((4, 28, 28), 200, dtype=np.uint8)
    path = _write(tmp_path / "a.npz", n=(4, 2, 4), train_images=flat, test_images=flat)
    ds = load_medmnist(path, image_size=16)
    assert ds.input_shape == (1, 16, 16) and ds.x_train.shape[1:] == (1, 16, 16)
    # a constant image stays that constant after resizing
    np.testing.assert_allclose(ds.x_test, 200 / 255.0, atol=1e-5)


def test_side_must_be_a_multiple_of_four(tmp_path) -> None:
    path = _write(tmp_path / "a.npz", side=30)
    with pytest.raises(DataError, match=r"multiple of 4.*image_size"):
        load_medmnist(path)
    assert load_medmnist(path, image_size=28).input_shape == (1, 28, 28)
    with pytest.raises(DataError, match=r"multiple of 4"):
        load_medmnist(path, image_size=30)


def test_n_samples_subset_is_stratified_and_deterministic(tmp_path) -> None:
    path = _write(tmp_path / "a.npz", n=(80, 20, 50))
    ds = load_medmnist(path, n_samples=60, seed=3)
    assert ds.n_train + ds.n_test == 60
    assert ds.n_test == round(60 * 50 / 150)
    assert np.bincount(ds.y_train).tolist() == [20, 20]  # stratified: 2 classes, equal halves
    again = load_medmnist(path, n_samples=60, seed=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    other = load_medmnist(path, n_samples=60, seed=4)
    assert not np.array_equal(ds.x_train, other.x_train)
    with pytest.raises(DataError, match=r"too many"):
        load_medmnist(path, n_samples=151)
    with pytest.raises(DataError, match=r">= 2"):
        load_medmnist(path, n_samples=1)


def test_missing_path_names_the_file_and_says_nothing_downloads(tmp_path) -> None:
    with pytest.raises(DataError, match=r"not found.*never downloads") as err:
        load_medmnist(tmp_path / "nope.npz")
    assert "nope.npz" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(DataError, match=r"is a directory"):
        load_medmnist(tmp_path)


def test_unreadable_file(tmp_path) -> None:
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match=r"cannot read .*broken.npz"):
        load_medmnist(bad)
    # object arrays need pickle, which is never allowed
    objects = np.empty(30, dtype=object)
    objects[:] = [object() for _ in range(30)]
    obj = _write(tmp_path / "obj.npz", train_images=objects)
    with pytest.raises(DataError, match=r"cannot read .*obj.npz"):
        load_medmnist(obj)


def test_missing_key_names_missing_and_found_keys(tmp_path) -> None:
    path = _write(tmp_path / "a.npz", drop=("test_labels",))
    with pytest.raises(DataError, match=r"missing the key.*test_labels") as err:
        load_medmnist(path)
    assert "found" in str(err.value) and "test_images" in str(err.value)
    half_val = _write(tmp_path / "b.npz", drop=("val_labels",))
    with pytest.raises(DataError, match=r"only one of val_images / val_labels"):
        load_medmnist(half_val)


def test_mismatched_images_and_labels(tmp_path) -> None:
    path = _write(tmp_path / "a.npz", train_labels=np.zeros((29, 1), np.uint8))
    with pytest.raises(DataError, match=r"train_images has 30 images but train_labels has 29"):
        load_medmnist(path)


def test_wrong_image_shapes(tmp_path) -> None:
    two_channel = np.zeros((30, 28, 28, 2), np.uint8)
    with pytest.raises(DataError, match=r"\[N, H, W, 3\]"):
        load_medmnist(_write(tmp_path / "a.npz", train_images=two_channel))
    other_side = np.zeros((12, 32, 32), np.uint8)
    with pytest.raises(DataError, match=r"one shape"):
        load_medmnist(_write(tmp_path / "b.npz", test_images=other_side))


def test_bad_arguments(tmp_path) -> None:
    path = _write(tmp_path / "a.npz")
    with pytest.raises(DataError, match=r"channels"):
        load_medmnist(path, channels=2)


def test_a_hospitals_own_file_is_split_as_the_file_ships_it_whatever_the_seed(tmp_path) -> None:
    """What a configured hospital runs (tasks.own_data under the run config's seed):
    training is the file's train + val, held-out its test split, image for image,
    for every seed; so no record's side depends on the seed or on the other records."""
    from bract import tasks
    from bract.flower.config import FederationConfig

    path = _write(tmp_path / "pneumoniamnist.npz")
    raw = np.load(path)
    train = np.concatenate([raw["train_images"], raw["val_images"]]) / 255.0
    for seed in (0, 3, 11):
        task = FederationConfig.from_run_config({"dataset": "medmnist", "num-classes": 2,
                                                 "in-channels": 1, "seed": seed}).task()
        own = tasks.own_data(task, str(path))
        np.testing.assert_allclose(own.x_train[:, 0], train, atol=1e-6)
        np.testing.assert_allclose(own.x_test[:, 0], raw["test_images"] / 255.0, atol=1e-6)


_NAN_IMAGES = np.full((30, 28, 28), np.nan, np.float32)
#: A MedMNIST file the hospital cannot use: how to write it, and load_medmnist's kwargs.
_BAD_FILES = {
    "missing file": (None, {}),
    "a folder": ("dir", {}),
    "not a zip": ("junk", {}),
    "missing key": ({"drop": ("test_labels",)}, {}),
    "half of val": ({"drop": ("val_labels",)}, {}),
    "images and labels of different lengths": (
        {"train_labels": np.zeros((29, 1), np.uint8)}, {}),
    "two-channel images": ({"train_images": np.zeros((30, 28, 28, 2), np.uint8)}, {}),
    "negative labels": ({"train_labels": np.full((30, 1), -1, np.int64)}, {}),
    "splits of different shapes": ({"test_images": np.zeros((12, 32, 32), np.uint8)}, {}),
    "empty test split": ({"n": (30, 6, 0)}, {}),
    "not square": ({"train_images": np.zeros((30, 28, 32), np.uint8),
                    "val_images": np.zeros((6, 28, 32), np.uint8),
                    "test_images": np.zeros((12, 28, 32), np.uint8)}, {}),
    "side not a multiple of 4": ({"side": 30}, {}),
    "n_samples too many": ({}, {"n_samples": 1000}),
    "NaN pixels": ({"train_images": _NAN_IMAGES}, {}),
}


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_a_failure_reply_names_no_part_of_the_hospitals_file_path(tmp_path, case) -> None:
    """A hospital's MedMNIST file that cannot be loaded: the message (its own log)
    names the file, the reply (failure_reason, what reaches the coordinator) names no
    component of its path, nor its counts."""
    from bract.flower.client import failure_reason

    path = tmp_path / "St_Elsewhere" / "Jane_Doe_MRN0000" / "pneumoniamnist.npz"
    path.parent.mkdir(parents=True)
    how, kwargs = _BAD_FILES[case]
    if how == "dir":
        path.mkdir()
    elif how == "junk":
        path.write_bytes(b"this is not a zip archive")
    elif how is not None:
        _write(path, **how)
    with pytest.raises(DataError) as err:
        load_medmnist(path, **kwargs)
    assert str(path) in str(err.value)
    reason = failure_reason(err.value)
    assert reason == err.value.public_reason and "details in its own log" in reason
    for part in path.parts[1:]:
        assert part not in reason, (part, reason)
    for figure in ("29", "30", "1000"):
        assert figure not in reason


@pytest.mark.parametrize("refused", ["examine the file", "open the file"])
def test_a_file_bract_may_not_read_is_refused_without_its_path(tmp_path, monkeypatch,
                                                              refused) -> None:
    """The operating system refusing bract the file (permission denied, on the file or a
    folder on its path) is a DataError in one line naming the file and the refusal, never
    a PermissionError whose text (the path) would reach the coordinator; the reply says
    why in the OS's words and names no part of the path."""
    import builtins

    from bract.flower.client import failure_reason

    path = tmp_path / "St_Elsewhere" / "Jane_Doe_MRN0000" / "pneumoniamnist.npz"
    path.parent.mkdir(parents=True)
    _write(path)

    def denied() -> PermissionError:  # tests run as root, whom chmod does not stop
        return PermissionError(13, "Permission denied", str(path))

    if refused == "examine the file":
        real_stat = Path.stat

        def stat(self, *args, **kwargs):
            if self == path:
                raise denied()
            return real_stat(self, *args, **kwargs)

        monkeypatch.setattr(Path, "stat", stat)
    else:
        real_open = builtins.open

        def opener(file, *args, **kwargs):
            if str(file) == str(path):
                raise denied()
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(DataError) as err:
        load_medmnist(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "Permission denied" in text
    reason = failure_reason(err.value)
    assert reason == err.value.public_reason == (
        "the hospital's data file cannot be read (Permission denied) (details in its own log)")
    for part in path.parts[1:]:
        assert part not in reason, (part, reason)
