"""Training with Accelerate: the loop, its deterministic batches, evaluation and the quickstart."""

from vqtok.train.evaluate import evaluate, save_reconstruction_grid
from vqtok.train.engine import CheckpointError, RunFolderError, TooManySkippedSteps, TrainingInterrupted
from vqtok.train.loop import train

__all__ = ["CheckpointError", "RunFolderError", "TooManySkippedSteps", "TrainingInterrupted", "evaluate",
           "save_reconstruction_grid", "train"]
