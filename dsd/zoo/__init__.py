"""Built-in models (``dsd:NAME`` wherever a model source is accepted) and the digits data they train on."""
from .digits import digits_splits
from .models import (MODELS, DigitsCNN, DigitsResNet, build, cache_dir, cached_weights, digits_cnn, digits_mobilenet,
                     digits_resnet)

__all__ = ["MODELS", "DigitsCNN", "DigitsResNet", "build", "cache_dir", "cached_weights", "digits_cnn",
           "digits_mobilenet", "digits_resnet", "digits_splits"]
