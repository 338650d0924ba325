"""naruto-lora's own folder for things it builds once (the demo models and data, planner results)."""

from __future__ import annotations

import os
from pathlib import Path


def nlora_home() -> Path:
    """``$NLORA_HOME``, else ``$XDG_CACHE_HOME/naruto-lora``, else ``~/.cache/naruto-lora``."""
    env = os.environ.get("NLORA_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "naruto-lora"
