"""Calibration: data-aware decoupling (input statistics, whitened decoupling, pointwise refit), the
calibration batches it runs on, and BatchNorm re-estimation."""
from .batches import CALIBRATION_SOURCES, calibration_batches, take_batches
from .batchnorm import recalibrate_batchnorm
from .data_aware import data_aware_layers, patch_statistics
from .statistics import PatchStats, RefitStats, refit_pointwise, whitened_depthwise, whitening

__all__ = ["CALIBRATION_SOURCES", "calibration_batches", "take_batches", "recalibrate_batchnorm", "data_aware_layers",
           "patch_statistics", "PatchStats", "RefitStats", "refit_pointwise", "whitened_depthwise", "whitening"]
