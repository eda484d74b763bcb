"""Convolutional network for single-channel medical images (chest X-rays).

The network uses GroupNorm instead of BatchNorm so that per-sample gradients
are well defined and Opacus DP-SGD can wrap it without modification.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ChestCNN"]


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm whose group count divides ``channels`` (at most 8 groups)."""
    groups = min(8, channels)
    while channels % groups != 0:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ChestCNN(nn.Module):
    """conv-GN-ReLU-pool, conv-GN-ReLU-pool, then a two-layer dense head.

    With the defaults (1x128x128 input, channels (16, 32), hidden 216, 3 classes)
    the model has about 7.1M parameters, almost all of them in the first Linear
    layer (32*32*32 -> 216). The size is intentional: it makes per-sample
    gradient memory significant, which the memory benchmark relies on.

    The module contains only Conv2d, GroupNorm, ReLU, MaxPool2d, Flatten and
    Linear layers, so ``opacus.validators.ModuleValidator.validate(model,
    strict=True)`` reports no errors.

    Input: float tensor ``[B, in_channels, image_size, image_size]``.
    Output: logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        image_size: int = 128,
        in_channels: int = 1,
        num_classes: int = 3,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 216,
    ) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4 != 0:
            raise ValueError(
                f"image_size must be a positive multiple of 4 (two 2x2 max-pools), "
                f"got {image_size}; resize images to e.g. {max(4, image_size // 4 * 4)}"
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        c1, c2 = channels
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            _group_norm(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            _group_norm(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``[B, num_classes]``."""
        return self.classifier(self.features(x))
