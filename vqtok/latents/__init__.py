"""Working in a tokenizer's latent space."""
