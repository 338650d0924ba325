"""LoRA injection, the weight formats, kohya's key names."""
