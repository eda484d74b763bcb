"""Models for bract: a DP-compatible chest X-ray CNN and tabular models."""

from bract.models.cnn import ChestCNN
from bract.models.tabular import TabularMLP, count_parameters

__all__ = ["ChestCNN", "TabularMLP", "count_parameters"]
