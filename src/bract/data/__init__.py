"""Data for bract federations: bundled datasets, synthetic X-rays, partitions."""

from bract.data.partition import iid_partition, partition_dataset
from bract.data.synthetic import CLASS_NAMES, synthetic_chest_xray
from bract.data.tabular import DATASET_NAMES, FederatedDataset, load_dataset

__all__ = [
    "CLASS_NAMES",
    "DATASET_NAMES",
    "FederatedDataset",
    "iid_partition",
    "load_dataset",
    "partition_dataset",
    "synthetic_chest_xray",
]
