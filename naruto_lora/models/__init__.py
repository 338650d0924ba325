"""Loading SDXL parts, and the registry of ``nlora:`` model and data ids."""
