"""naruto-lora's built-in plugins, installed as the ``nlora_plugins`` package.

Each module defines one plugin class and exposes it as ``PLUGIN``. They are found as third-party
plugins are, through the ``nlora`` entry-point group: a new file here needs its line in
``[project.entry-points.nlora]`` of ``pyproject.toml`` (a test checks every module has one).
"""
