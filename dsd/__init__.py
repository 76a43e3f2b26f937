"""dsd: turn a trained CNN's Conv2d layers into depthwise-separable, optionally dilated, convolutions."""
from .convert import (
    ConversionPlan,
    ConversionReport,
    ConvertOptions,
    DepthwiseSeparableConv2d,
    apply_plan,
    convert_model,
    fold_batchnorm,
    from_conv,
)
from .errors import DsdError
from .io import export_onnx, load_converted, load_model, save_converted
from .savings import SavingsReport, compare
from .timing import BenchmarkSettings

__version__ = "0.1.0"

__all__ = ["convert_model", "ConvertOptions", "fold_batchnorm", "apply_plan", "from_conv", "DepthwiseSeparableConv2d",
           "ConversionPlan", "ConversionReport", "compare", "SavingsReport", "BenchmarkSettings", "load_model",
           "load_converted", "save_converted", "export_onnx", "DsdError", "__version__"]
