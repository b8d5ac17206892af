"""fastft: lean, high-throughput LoRA fine-tuning for GPT-OSS."""

__version__ = "0.1.0"
