"""Datasets and loaders for fine-tuning: ``digits`` (offline, real), MNIST, CIFAR-10 and ImageFolder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from ..errors import DsdError
from .recipe import DataConfig

__all__ = ["digits_splits", "build_datasets", "build_loaders", "Loaders", "DIGITS_SPLIT_SEED"]

DIGITS_SPLIT_SEED = 0  # the train/val split is fixed: results are comparable across runs and machines


def digits_splits(image_size: int = 32, channels: int = 1) -> Tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 handwritten 8x8 digits: a fixed stratified 80/20 split, resized, in [-1, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    elif channels != 1:
        raise DsdError(f"data.channels: expected 1 or 3, got {channels}")
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2,
                                          stratify=labels.numpy(), random_state=DIGITS_SPLIT_SEED)
    return (TensorDataset(images[train_idx], labels[train_idx]), TensorDataset(images[val_idx], labels[val_idx]))


def _torchvision_dataset(cfg: DataConfig, cls_name: str):
    import torchvision
    from torchvision import transforms

    if not cfg.root:
        raise DsdError(f"data.root: {cls_name} needs the folder that holds (or will hold) the dataset")
    mean, std = ((0.5,) * cfg.channels, (0.5,) * cfg.channels)
    gray = [transforms.Grayscale(cfg.channels)] if cls_name == "MNIST" or cfg.channels == 1 else []
    base = [*gray, transforms.Resize(cfg.image_size), transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose([transforms.RandomCrop(cfg.image_size, padding=cfg.image_size // 8), *base])
    cls = getattr(torchvision.datasets, cls_name)
    try:
        return (cls(cfg.root, train=True, download=cfg.download, transform=train_tf),
                cls(cfg.root, train=False, download=cfg.download, transform=transforms.Compose(base)))
    except RuntimeError as error:
        raise DsdError(f"{cls_name} not found under {cfg.root} ({error}); put the dataset there, or set "
                       "data.download=true on a machine with internet access") from error


def _imagefolder(cfg: DataConfig):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root or "")
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DsdError(f"data.root: {root} must contain train/ and val/ folders with one sub-folder per class")
    config = resolve_data_config({"input_size": (cfg.channels, cfg.image_size, cfg.image_size)})
    return (ImageFolder(root / "train", create_transform(**config, is_training=True)),
            ImageFolder(root / "val", create_transform(**config, is_training=False)))


def build_datasets(cfg: DataConfig) -> Tuple[Dataset, Dataset]:
    if cfg.name == "digits":
        return digits_splits(cfg.image_size, cfg.channels)
    if cfg.name == "mnist":
        return _torchvision_dataset(cfg, "MNIST")
    if cfg.name == "cifar10":
        return _torchvision_dataset(cfg, "CIFAR10")
    if cfg.name == "imagefolder":
        return _imagefolder(cfg)
    raise DsdError(f"data.name: unknown dataset {cfg.name!r}")


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler


def build_loaders(cfg: DataConfig, seed: int, world_size: int = 1, rank: int = 0,
                  pin_memory: bool = False) -> Loaders:
    """Loaders whose shuffling depends only on (seed, epoch): a resumed run sees the same batches.

    A DistributedSampler is used in every case (one replica when not distributed) so that
    ``set_epoch`` makes the order reproducible; validation is split across ranks and all-reduced.
    """
    train, val = build_datasets(cfg)
    train_sampler = DistributedSampler(train, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    val_sampler = DistributedSampler(val, world_size, rank, shuffle=False)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=pin_memory,
                  persistent_workers=cfg.workers > 0)
    return Loaders(DataLoader(train, sampler=train_sampler, drop_last=True, **common),
                   DataLoader(val, sampler=val_sampler, **common), train_sampler)
