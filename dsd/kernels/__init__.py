"""Fused kernels: ``separable_conv2d`` (depthwise + pointwise in one Triton kernel on CUDA)."""
from .separable_op import (FUSED_DTYPES, arrange_weights, arranged_separable_conv2d, fused_kernel_enabled,
                           interpreted_separable_conv2d, separable_conv2d, use_fused_kernel)

__all__ = ["separable_conv2d", "arranged_separable_conv2d", "arrange_weights", "interpreted_separable_conv2d",
           "FUSED_DTYPES", "use_fused_kernel", "fused_kernel_enabled"]
