"""Fine-tuning by knowledge distillation: recipes, data, the training engine, DDP through torchrun."""
from ..calibration import recalibrate_batchnorm
from ..zoo.digits import digits_splits
from .data import build_loaders
from .engine import TrainingDiverged, evaluate, train
from .losses import distillation_loss
from .recipe import Recipe, builtin_recipes, load_recipe, recipe_from_dict
from .run import FinetuneResult, finetune
