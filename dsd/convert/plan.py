"""The conversion plan: a JSON record of every converted layer, enough to rebuild the architecture.

A plan plus a state dict (safetensors) restores a converted model without pickle:
``apply_plan(fresh_model, plan)`` swaps in empty separable layers, then ``load_state_dict`` fills them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import DsdError
from ..fileio import atomic_write_text
from ..layers.spec import LayerSpec

__all__ = ["ConversionPlan", "PLAN_VERSION"]

PLAN_VERSION = 1


@dataclass
class ConversionPlan:
    layers: List[LayerSpec]
    options: Dict[str, Any] = field(default_factory=dict)  # ConvertOptions.to_dict() of the conversion
    source: Optional[Dict[str, Any]] = None  # how to rebuild the original model (set by save_converted)
    version: int = PLAN_VERSION
    folded_batchnorm: List[Tuple[str, str]] = field(default_factory=list)  # (conv, norm) folded for inference

    def to_dict(self) -> Dict[str, Any]:
        data = {"version": self.version, "source": self.source, "options": self.options,
                "layers": [layer.to_dict() for layer in self.layers]}
        if self.folded_batchnorm:
            data["folded_batchnorm"] = [list(pair) for pair in self.folded_batchnorm]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ConversionPlan":
        version = data.get("version")
        if version != PLAN_VERSION:
            raise DsdError(f"conversion plan version {version!r} is not supported (this dsd reads {PLAN_VERSION})")
        folded = [(str(conv), str(norm)) for conv, norm in data.get("folded_batchnorm", [])]
        return cls([LayerSpec.from_dict(layer) for layer in data["layers"]], data.get("options", {}),
                   data.get("source"), version, folded)

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ConversionPlan":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DsdError(f"{path}: no such plan file") from None
        except DsdError:
            raise
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DsdError(f"{path} is not a readable dsd conversion plan ({type(error).__name__}: {error}); "
                           "write it again with dsd-convert") from error
