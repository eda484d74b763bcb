"""Data for bract federations: bundled datasets, MedMNIST files, image folders,
synthetic X-rays, held-out splits by record identity, and IID / non-IID partitions
between hospitals."""

from bract.data.errors import DataError
from bract.data.holdout import held_out_mask, split_by_identity
from bract.data.imagefolder import find_images, load_image_folder, read_image
from bract.data.medmnist import MEDMNIST_KEYS, load_medmnist, medmnist_labels
from bract.data.partition import (
    PARTITION_SCHEMES,
    column_partition,
    dataset_partitions,
    dirichlet_partition,
    iid_partition,
    partition_dataset,
    partition_indices,
    quantity_skew_partition,
    resolve_column,
)
from bract.data.synthetic import CLASS_NAMES, synthetic_chest_xray
from bract.data.tabular import DATASET_NAMES, FederatedDataset, load_dataset

__all__ = [
    "CLASS_NAMES",
    "DATASET_NAMES",
    "MEDMNIST_KEYS",
    "PARTITION_SCHEMES",
    "DataError",
    "FederatedDataset",
    "column_partition",
    "dataset_partitions",
    "dirichlet_partition",
    "find_images",
    "held_out_mask",
    "iid_partition",
    "load_dataset",
    "load_image_folder",
    "load_medmnist",
    "medmnist_labels",
    "partition_dataset",
    "partition_indices",
    "quantity_skew_partition",
    "read_image",
    "resolve_column",
    "split_by_identity",
    "synthetic_chest_xray",
]
