"""naruto-lora: an SDXL LoRA trainer built from pluggy plugins and TOML profiles."""

__version__ = "0.1.0"
