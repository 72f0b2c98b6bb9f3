"""What a VAE's latent space is for, beyond generation: interpolation between images, latent arithmetic
(attribute vectors, analogies) and traversals of single latent elements, for any vqtok tokenizer (or, for the first
two, anything with the `LatentSpace` interface)."""

from vqtok.latents.arithmetic import ClassMeans, analogy, apply_attribute, attribute_vector, class_means
from vqtok.latents.interpolation import (
    default_method,
    interpolate,
    interpolate_latents,
    interpolation_times,
    lerp,
    slerp,
)
from vqtok.latents.space import GaussianLatents, HierarchicalLatents, LatentSpace, VQFeatures, latent_space
from vqtok.latents.traversal import Traversal, TraversedElement, save_traversal_grid, traverse

__all__ = [
    "ClassMeans",
    "GaussianLatents",
    "HierarchicalLatents",
    "LatentSpace",
    "Traversal",
    "TraversedElement",
    "VQFeatures",
    "analogy",
    "apply_attribute",
    "attribute_vector",
    "class_means",
    "default_method",
    "interpolate",
    "interpolate_latents",
    "interpolation_times",
    "latent_space",
    "lerp",
    "save_traversal_grid",
    "slerp",
    "traverse",
]
