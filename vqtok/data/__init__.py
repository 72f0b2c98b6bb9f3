"""Data: image sources for training and encoding, and the token store."""

from vqtok.data.sources import ImageDataset, UnreadableImageError, build_dataset, read_idx
from vqtok.data.token_store import TokenDataset, TokenStoreError, encode_dataset

__all__ = ["ImageDataset", "TokenDataset", "TokenStoreError", "UnreadableImageError", "build_dataset", "encode_dataset",
           "read_idx"]
