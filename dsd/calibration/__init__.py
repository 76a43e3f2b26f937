"""Calibration: data-aware decoupling (input statistics, whitened decoupling, pointwise refit), the
calibration batches it runs on, BatchNorm re-estimation, and how far each layer moves the outputs."""
from .batches import CALIBRATION_SOURCES, calibration_and_held_out, calibration_batches, take_batches
from .batchnorm import recalibrate_batchnorm
from .data_aware import data_aware_layers, patch_statistics
from .sensitivity import output_sensitivity
from .statistics import (PatchStats, RefitStats, output_rank_errors, refit_pointwise, whitened_depthwise,
                         whitening)

__all__ = ["CALIBRATION_SOURCES", "calibration_and_held_out", "calibration_batches", "take_batches",
           "recalibrate_batchnorm", "data_aware_layers",
           "patch_statistics", "output_sensitivity", "PatchStats", "RefitStats", "output_rank_errors", "refit_pointwise", "whitened_depthwise", "whitening"]
