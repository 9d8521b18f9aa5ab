"""sd3jax: pretrain Stable-Diffusion-3-class MM-DiT models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="sd3jax",
    version="0.1.0",
    description="Pretrain SD3-class rectified-flow MM-DiT text-to-image models in JAX/Flax.",
    packages=find_packages(include=["sd3jax", "sd3jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "ml-collections",
        "absl-py",
        "transformers>=4.45",
        "safetensors",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
        "tensorboardX",
    ],
    extras_require={
        # torch 2.13.0 is the CPU build on this machine's disk; other versions pull CUDA builds.
        "test": ["pytest", "torch==2.13.0", "diffusers", "scipy"],
    },
    entry_points={"console_scripts": ["sd3jax=sd3jax.cli:main"]},
)
