"""Sampling pipelines and image grids."""
