from setuptools import setup

setup(
    name="fastft",
    version="0.1.0",
    description="Lean, high-throughput LoRA fine-tuning for GPT-OSS",
    python_requires=">=3.10",
    # kernels/ lives at the top level but installs as fastft.kernels: a bare `kernels` package would shadow the
    # Hugging Face kernel hub package that transformers probes for.
    packages=["fastft", "fastft.data", "fastft.model", "fastft.kernels"],
    package_dir={"fastft": "fastft", "fastft.kernels": "kernels"},
    package_data={"fastft": ["assets/tiny/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system=='Linux'",
        "transformers>=4.55",
        "peft>=0.17",
        "datasets>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm",
        "pyyaml",
        "matplotlib",
        "tensorboard",
        "numpy",
    ],
    extras_require={
        "gpu": ["bitsandbytes>=0.45", "deepspeed>=0.16"],
        "dev": ["pytest"],
    },
    entry_points={"console_scripts": ["fastft=fastft.train:main"]},
)
