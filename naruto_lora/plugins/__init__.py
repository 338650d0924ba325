"""The plugin system: hookspecs, the manager, the core's default hook implementations."""
