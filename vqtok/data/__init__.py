"""Data: image sources for training and encoding (and, later, the token store)."""

from vqtok.data.sources import ImageDataset, UnreadableImageError, build_dataset, read_idx

__all__ = ["ImageDataset", "UnreadableImageError", "build_dataset", "read_idx"]
