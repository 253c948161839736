"""lima-jax: LIMA (Less Is More for Alignment) fine-tuning of LLaMA in JAX/Flax for Cloud TPU pods."""
from setuptools import find_packages, setup

setup(
    name="lima-jax",
    version="0.1.0",
    description="LIMA supervised fine-tuning of LLaMA in JAX/Flax (NNX) on TPU pods",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lima_jax", "lima_jax.*", "data_pipeline", "data_pipeline.*"]),
    package_data={"": ["*.gin", "*.json", "*.jsonl", "*.txt"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "sentencepiece==0.2.3",
        "ml_dtypes==0.6.0",
        "etils==1.15.0",
        "gin-config==0.5.0",
        "safetensors==0.8.0",
        "tqdm==4.70.1",
        "numpy==2.4.6",
        "matplotlib==3.11.2",
        "tensorboard==2.21.0",
    ],
    extras_require={
        "test": [
            "pytest==9.2.0",
            "scipy==1.17.1",
            "torch==2.13.0",
            "transformers==5.24.0",
        ],
        "tpu": ["libtpu==0.0.52"],
        # NVIDIA GPUs: JAX's CUDA 12 plugin at jax's own version, with CUDA and cuDNN as wheels (~3 GB).
        "cuda": ["jax-cuda12-plugin[with-cuda]==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    },
    entry_points={
        "console_scripts": [
            "lima-train=lima_jax.cli.train:main",
            "lima-decode=lima_jax.cli.decode:main",
            "lima-chat=lima_jax.cli.chat:main",
            "lima-convert=lima_jax.cli.convert:main",
            "lima-aot=lima_jax.cli.aot:main",
            "lima-report=lima_jax.cli.report:main",
            "lima-data=data_pipeline.cli:main",
        ],
    },
)
