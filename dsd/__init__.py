"""dsd: turn a trained CNN's Conv2d layers into depthwise-separable, optionally dilated, convolutions.

The public names load on first use (PEP 562), so ``dsd --version`` and ``import dsd`` start at once;
``dsd.convert_model`` and the rest import torch the first time they are touched.
"""
import importlib
from typing import Any, List

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "convert_model": ".convert", "ConvertOptions": ".convert", "fold_batchnorm": ".convert",
    "apply_plan": ".convert", "from_conv": ".convert", "DepthwiseSeparableConv2d": ".convert",
    "ConversionPlan": ".convert", "ConversionReport": ".convert",
    "compare": ".savings", "SavingsReport": ".savings", "BenchmarkSettings": ".timing",
    "load_model": ".io", "load_converted": ".io", "save_converted": ".io", "export_onnx": ".io",
    "DsdError": ".errors",
}
_SUBPACKAGES = ("calibration", "cli", "convert", "demo", "errors", "fileio", "finetune", "images", "io", "kernels",
                "layers", "modes", "module_tree", "savings", "timing", "validation", "zoo")

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'dsd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted([*globals(), *_PUBLIC, *_SUBPACKAGES])
