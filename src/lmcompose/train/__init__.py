"""Training a composition: the recipe (setup, step, evaluate, save, loop), its config, resumable checkpoints, faults,
the run log and evaluation metrics."""

from .config import TrainingConfig
from .faults import TrainingDivergedError
from .recipe import TrainingResult, train

__all__ = ["TrainingConfig", "TrainingDivergedError", "TrainingResult", "train"]
