"""Models for tabular data: logistic/linear regression and a one-hidden-layer MLP."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TabularMLP", "count_parameters"]


class TabularMLP(nn.Module):
    """Linear model (``hidden=None``) or one-hidden-layer ReLU MLP.

    * ``n_classes >= 2``: classification; outputs logits ``[B, n_classes]``
      (use with ``nn.CrossEntropyLoss``). With ``hidden=None`` this is
      multinomial logistic regression.
    * ``n_classes == 1``: regression; outputs ``[B, 1]`` (use with
      ``nn.MSELoss``). With ``hidden=None`` this is linear regression.

    Only Linear and ReLU layers are used, so the model is Opacus-compatible.
    """

    def __init__(self, n_features: int, n_classes: int, hidden: int | None = None) -> None:
        super().__init__()
        if n_features < 1:
            raise ValueError(f"n_features must be >= 1, got {n_features}")
        if n_classes < 1:
            raise ValueError(
                f"n_classes must be >= 1 (1 = regression head, >=2 = classification), "
                f"got {n_classes}"
            )
        if hidden is not None and hidden < 1:
            raise ValueError(f"hidden must be None or >= 1, got {hidden}")
        self.n_features = n_features
        self.n_classes = n_classes
        self.hidden = hidden
        self.net: nn.Module
        if hidden is None:
            self.net = nn.Linear(n_features, n_classes)
        else:
            self.net = nn.Sequential(
                nn.Linear(n_features, hidden),
                nn.ReLU(),
                nn.Linear(hidden, n_classes),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Return ``[B, n_classes]`` logits (or ``[B, 1]`` predictions for regression)."""
        return self.net(x)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Total number of scalar parameters in ``model`` (only trainable ones if asked)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
