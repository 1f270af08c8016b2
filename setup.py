"""Install megatron_adadpo: AdaDPO and the DPO family as a Megatron-Core plugin."""

from setuptools import find_packages, setup

setup(
    name="megatron_adadpo",
    version="0.2.0",
    description="AdaDPO (balanced-gradient DPO) and the DPO family for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_adadpo", "megatron_adadpo.*"]),
    install_requires=[
        "torch>=2.4",
        # CI tests both ends: 0.16.1 (Python 3.11, requirements/cpu.txt) and 0.19.2
        # (Python 3.12, requirements/newest.txt); 0.17+ need Python >= 3.12 and triton.
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # dist_checkpointing's save worker needs it (undeclared upstream)
        "numpy",
        "pyyaml",
        "sentencepiece",
        "datasets",
        "xxhash",  # checksums of preprocessed data (also a dependency of datasets)
        "tqdm",
    ],
    extras_require={
        # Transformer Engine brings the TE layer spec and FP8; apex (fused Adam / norms) is
        # built from source: see README "GPU install".
        "gpu": ["transformer-engine[pytorch]", "tensorboard"],
        "wandb": ["wandb"],
        "hf": ["transformers>=4.45", "safetensors", "tokenizers"],
        "plot": ["matplotlib"],
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "ruff",
            "transformers>=4.45",
            "safetensors",
            "tokenizers",
            "matplotlib",
            "tensorboard",
            "wandb",
            "trl",  # test oracle only (tests/unit/test_trl_oracle*.py); never imported at run time
            "peft",  # test oracle for LoRA adapter export
        ],
    },
)
