"""Datasets whose items are dicts (Flower Datasets, Hugging Face) as ``(x, y)`` pairs.

bract's DP-SGD, its sensitivity probe and its metrics release read each item of a
hospital's dataset as an ``(inputs, labels)`` pair. A Flower Datasets partition
with a transform yields dicts such as ``{"img": tensor, "label": 3}``: name the two
keys once (``batch_keys=("img", "label")`` on :class:`~bract.privacy.PrivateTrainer`
or :class:`~bract.flower.client.HospitalSetup`, or :func:`pairs_of` on a DataLoader)
and every item becomes ``(item["img"], item["label"])``; nothing else changes (the
DataLoader's batch size, collate function and workers are kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader, Dataset

from bract.privacy.accounting import PrivacyError

__all__ = ["PairDataset", "pairs_of"]


class PairDataset(Dataset):
    """``dataset`` with each dict item turned into ``(item[inputs], item[labels])``;
    a missing key raises :class:`PrivacyError` naming the keys the item has."""

    def __init__(self, dataset: Any, inputs: str, labels: str) -> None:
        self.dataset, self.inputs, self.labels = dataset, inputs, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise PrivacyError(f"batch_keys {(self.inputs, self.labels)!r} were given, but "
                               f"an item of the dataset is a {type(item).__name__}, not a dict")
        missing = [k for k in (self.inputs, self.labels) if k not in item]
        if missing:
            raise PrivacyError(f"an item of the dataset has no key(s) {missing}; its keys are "
                               f"{sorted(map(str, item))}: set batch_keys=(inputs, labels) "
                               "from them")
        return item[self.inputs], item[self.labels]


def pairs_of(loader: DataLoader, inputs: str, labels: str) -> DataLoader:
    """``loader`` over the same dataset, each dict item read as ``(inputs, labels)``."""
    if not isinstance(loader, DataLoader):
        raise PrivacyError(f"expected a torch DataLoader, got {type(loader).__name__}")
    return DataLoader(
        PairDataset(loader.dataset, inputs, labels), batch_size=loader.batch_size,
        collate_fn=loader.collate_fn, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, drop_last=loader.drop_last,
    )


def check_batch_keys(batch_keys: Any) -> tuple[str, str] | None:
    """``batch_keys`` as a pair of key names, or ``None``; ``PrivacyError`` otherwise."""
    if batch_keys is None:
        return None
    if (not isinstance(batch_keys, (tuple, list)) or len(batch_keys) != 2
            or not all(isinstance(k, str) and k for k in batch_keys)):
        raise PrivacyError(f"batch_keys must be two key names (inputs, labels), e.g. "
                           f"('img', 'label'); got {batch_keys!r}")
    return batch_keys[0], batch_keys[1]
