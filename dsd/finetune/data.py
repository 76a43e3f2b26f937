"""Datasets and loaders for fine-tuning: ``digits`` (offline, real), MNIST, CIFAR-10 and ImageFolder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import DsdError
from ..images import image_folder, image_transform
from ..zoo.digits import digits_splits
from .recipe import DataConfig

__all__ = ["build_datasets", "build_loaders", "check_data", "Loaders"]


def _torchvision_dataset(cfg: DataConfig, cls_name: str):
    import torchvision
    from torchvision import transforms

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


def check_data(cfg: DataConfig) -> None:
    """Refuse a data section that cannot work, before anything slow (a teacher trained or loaded) runs."""
    if cfg.name in ("mnist", "cifar10") and not cfg.root:
        raise DsdError(f"data.root: {cfg.name} needs the folder that holds (or will hold) the dataset")
    if cfg.name == "imagefolder":
        root = Path(cfg.root or "")
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise DsdError(f"data.root: {root} must contain train/ and val/ folders with one sub-folder per class")


def _imagefolder(cfg: DataConfig, model: Optional[nn.Module]):
    root = Path(cfg.root)
    size = (cfg.channels, cfg.image_size, cfg.image_size)
    return (image_folder(root / "train", image_transform(size, model, training=True), cfg.channels),
            image_folder(root / "val", image_transform(size, model), cfg.channels))


def build_datasets(cfg: DataConfig, model: Optional[nn.Module] = None) -> Tuple[Dataset, Dataset]:
    """The recipe's train and val sets; an ImageFolder's transforms are timm's for ``model``'s data config (its
    ``pretrained_cfg``: normalisation, interpolation, crop) at the recipe's image size, as timm's train script does."""
    check_data(cfg)
    if cfg.name == "digits":
        return digits_splits(cfg.image_size, cfg.channels)
    if cfg.name == "mnist":
        return _torchvision_dataset(cfg, "MNIST")
    if cfg.name == "cifar10":
        return _torchvision_dataset(cfg, "CIFAR10")
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, model)
    raise DsdError(f"data.name: unknown dataset {cfg.name!r}")


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler


def build_loaders(cfg: DataConfig, seed: int, world_size: int = 1, rank: int = 0,
                  pin_memory: bool = False, model: Optional[nn.Module] = None) -> Loaders:
    """Loaders whose shuffling depends only on (seed, epoch): a resumed run sees the same batches; ``model``: as in
    :func:`build_datasets`.

    A DistributedSampler is used in every case (one replica when not distributed) so that
    ``set_epoch`` makes the order reproducible; validation is split across ranks and all-reduced.
    """
    train, val = build_datasets(cfg, model)
    train_sampler = DistributedSampler(train, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    val_sampler = DistributedSampler(val, world_size, rank, shuffle=False)
    common = dict(batch_size=cfg.batch_size, num_workers=cfg.workers, pin_memory=pin_memory,
                  persistent_workers=cfg.workers > 0)
    return Loaders(DataLoader(train, sampler=train_sampler, drop_last=True, **common),
                   DataLoader(val, sampler=val_sampler, **common), train_sampler)
