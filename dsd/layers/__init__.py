"""The layer mathematics: the separable module, padding geometry, costs, decoupling, conv adapters, ``from_conv``.

Nothing here knows about whole models: the conversion pass (:mod:`dsd.convert`) builds on these.
"""
from .adapters import ConvAdapter, get_conv_adapter, register_conv_adapter
from .create import FULL_RANK, SkipLayer, build_layer, from_conv, layer_spec
from .decouple import decouple, full_rank, get_initializer, list_initializers, register_initializer
from .forms import autotune_forms, forms_timed_as_cuda_graphs, static_forms
from .padding import TF_SAME
from .separable import DepthwiseSeparableConv2d
from .spec import LayerSpec

__all__ = ["ConvAdapter", "get_conv_adapter", "register_conv_adapter", "FULL_RANK", "SkipLayer", "build_layer",
           "from_conv", "layer_spec", "decouple", "full_rank", "get_initializer", "list_initializers",
           "register_initializer", "autotune_forms", "static_forms", "forms_timed_as_cuda_graphs", "TF_SAME",
           "DepthwiseSeparableConv2d", "LayerSpec"]
