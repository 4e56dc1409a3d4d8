"""scikit-learn's bundled digits (1,797 8x8 images, shipped inside the package: no download),
scaled to [0, 1], with a fixed held-out split."""

from __future__ import annotations

import torch

N_TEST = 297  # the last 297 images are never trained on


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels); images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    return images[:-N_TEST], labels[:-N_TEST], images[-N_TEST:], labels[-N_TEST:]
