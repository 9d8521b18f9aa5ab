"""sd3jax: SD3-class rectified-flow MM-DiT pretraining in JAX/Flax."""
__version__ = "0.1.0"
