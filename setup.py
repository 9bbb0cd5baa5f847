"""gripjax: Group-Relative Importance Pruning of visual tokens for VLMs, in JAX/Flax."""

import setuptools

setuptools.setup(
    name="gripjax",
    version="0.1.0",
    description="GRIP-VLM visual-token pruning (GRPO-trained budget-aware agent) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["gripjax", "gripjax.*"]),
    package_data={"gripjax": ["data/vocab.txt", "assets/*", "assets/*/*", "assets/*/*/*", "assets/*/*/*/*"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorflow-datasets>=4.9.9",
        "array_record>=0.8",
        "ml-collections>=1.1",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10",
        # Benchmark files (parquet with embedded images) are read with pyarrow.
        "pyarrow>=14",
        # The benchmark's real images: handwritten digits and photos shipped inside these packages.
        "scikit-learn>=1.4",
        "scikit-image>=0.22",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        # HF LLaVA checkpoints are a first-class input (gripjax/models/hf_llava.py, data/hf_*.py):
        # numpy readers of safetensors and the tokenizers library, no torch.
        "safetensors>=0.4",
        "tokenizers>=0.19",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Only tools/make_hf_fixtures.py, which writes the committed parity fixtures.
        "parity": ["torch==2.13.0", "transformers", "safetensors", "tokenizers", "scikit-image"],
    },
)
