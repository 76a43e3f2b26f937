"""Models in and out: source strings and model files, converted checkpoints, ONNX export, output paths."""
from .converted import load_converted, plan_path_for, save_converted, write_converted
from .onnx import export_onnx
from .outputs import OutputPaths, check_outputs, default_stem, output_paths
from .sources import (SUPPORTED_FORMATS, ModelSource, SourceRef, build_arch, load_model, load_state_dict_file,
                      parse_source)

__all__ = ["load_converted", "plan_path_for", "save_converted", "write_converted", "export_onnx", "OutputPaths",
           "check_outputs", "default_stem", "output_paths", "SUPPORTED_FORMATS", "ModelSource", "SourceRef", "build_arch", "load_model",
           "load_state_dict_file", "parse_source"]
