"""Flax Linen models: the MM-DiT, the autoencoder and the text encoders."""
