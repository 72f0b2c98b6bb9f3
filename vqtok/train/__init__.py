"""Training with Accelerate: the loop, its deterministic batches, evaluation and the quickstart."""

from vqtok.train.evaluate import evaluate, save_reconstruction_grid
from vqtok.train.engine import TooManySkippedSteps
from vqtok.train.loop import train

__all__ = ["TooManySkippedSteps", "evaluate", "save_reconstruction_grid", "train"]
