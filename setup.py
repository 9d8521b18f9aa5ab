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
        "scipy",
        "pillow",
        "matplotlib",
        "tqdm",
        "tensorboardX",
        "faiss-cpu",  # sd3jax dedup: kNN search (flat / IVF-PQ)
    ],
    extras_require={
        # torch 2.13.0 is the CPU build on this machine's disk; other versions pull CUDA builds.
        # libtpu lets `sd3jax compile` build for a TPU topology on any machine; pinned to the
        # version jax 0.10.2 was built against.
        # torchvision 0.28.0 pairs with torch 2.13.0; only its pure-Python model zoo is used.
        # pytest-xdist: the suite runs in two processes (CI: 51 -> 38 min on 2 cores).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "torchvision==0.28.0", "diffusers",
                 "libtpu==0.0.42.1"],
        "tpu": ["libtpu==0.0.42.1"],
    },
    entry_points={"console_scripts": ["sd3jax=sd3jax.cli:main"]},
)
