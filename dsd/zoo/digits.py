"""scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits) as image tensors: the data the built-in
models are trained on, and the offline data set of the ``digits`` recipe and ``--calib digits``."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import DsdError

__all__ = ["digits_splits", "DIGITS_SPLIT_SEED", "DIGITS_IMAGE_SIZE", "DIGITS_MEAN", "DIGITS_STD"]

DIGITS_SPLIT_SEED = 0  # the train/val split is fixed: results are comparable across runs and machines
DIGITS_IMAGE_SIZE = 32  # the 8x8 images upsampled: room for two poolings and 3x3 convs
DIGITS_MEAN, DIGITS_STD = 0.5, 0.5  # pixel values in [0, 1] mapped to [-1, 1]


def digits_splits(image_size: int = DIGITS_IMAGE_SIZE, channels: int = 1) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits: a fixed stratified 80/20 split, resized, in [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - DIGITS_MEAN) / DIGITS_STD
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    elif channels != 1:
        raise DsdError(f"data.channels: expected 1 or 3, got {channels}")
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2,
                                          stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED)
    return (TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx]))
