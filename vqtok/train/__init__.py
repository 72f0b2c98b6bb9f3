"""Training with Accelerate: the loop, its deterministic batches, evaluation and the quickstart."""

from vqtok.train.evaluate import evaluate, save_reconstruction_grid
from vqtok.train.loop import TooManySkippedSteps, train

__all__ = ["TooManySkippedSteps", "evaluate", "save_reconstruction_grid", "train"]
