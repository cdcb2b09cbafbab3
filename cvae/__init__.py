"""A causal VAE for dSprites on Ray: data, training, and an SCM that answers queries."""
__version__ = "0.1.0"
