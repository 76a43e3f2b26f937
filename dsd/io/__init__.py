"""Models in and out: specs and files to load, converted checkpoints, ONNX export, output paths."""
from .calibration import CALIBRATION_SOURCES, calibration_batches
from .converted import load_converted, plan_path_for, save_converted
from .load import load_model
from .onnx import export_onnx
from .outputs import OutputPaths, check_outputs, default_stem, output_paths
from .sources import SUPPORTED_FORMATS, ModelSource, build_arch, load_source_model, load_state_dict_file
