"""Training with Accelerate: the loop, its deterministic batches, evaluation and the quickstart."""

from vqtok.train.engine import TooManySkippedSteps
from vqtok.train.evaluate import evaluate, save_reconstruction_grid
from vqtok.train.loop import train
from vqtok.train.run_folder import CheckpointError, RunFolderError, TrainingInterrupted

__all__ = ["CheckpointError", "RunFolderError", "TooManySkippedSteps", "TrainingInterrupted", "evaluate",
           "save_reconstruction_grid", "train"]
