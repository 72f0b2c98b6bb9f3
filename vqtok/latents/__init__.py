"""What a VAE's latent space is for, beyond generation: interpolation between images and latent arithmetic
(attribute vectors, analogies), for any vqtok tokenizer or anything with its `LatentSpace` interface."""

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

__all__ = [
    "ClassMeans",
    "GaussianLatents",
    "HierarchicalLatents",
    "LatentSpace",
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
    "slerp",
]
