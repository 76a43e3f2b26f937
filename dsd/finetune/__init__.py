"""Fine-tuning by knowledge distillation: recipes, data, the training engine, DDP through torchrun."""
from ..batchnorm import recalibrate_batchnorm
from .data import build_loaders, digits_splits
from .engine import TrainingDiverged, evaluate, train
from .losses import distillation_loss
from .recipe import Recipe, builtin_recipes, load_recipe, recipe_from_dict
from .run import FinetuneResult, finetune
