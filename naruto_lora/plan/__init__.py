"""The VRAM planner."""
