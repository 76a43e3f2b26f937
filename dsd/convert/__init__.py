"""The conversion pass: dense Conv2d -> depthwise-separable (optionally dilated), shape-preserving."""
from .adapters import ConvAdapter, get_conv_adapter, register_conv_adapter
from .decouple import decouple, full_rank, get_initializer, list_initializers, register_initializer
from .factory import FULL_RANK, SkipLayer, from_conv, layer_spec
from .geometry import TF_SAME
from .pipeline import PlanMismatch, apply_plan, convert_model
from .plan import ConversionPlan, LayerSpec
from .report import ConversionReport, LayerRecord
from .rules import SKIP_PREDICATES, ConversionOptions
from .separable import DepthwiseSeparableConv2d
from .trace import create_tracer, trace
