"""Shared helpers that know nothing of SDXL: atomic file writes, the console, user errors."""
