"""naruto-lora's built-in plugins, installed as the ``nlora_plugins`` package.

Each module defines one plugin class and exposes it as ``PLUGIN``; the core discovers them by
scanning this package, so adding a file here adds a plugin.
"""
