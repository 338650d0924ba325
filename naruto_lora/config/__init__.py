"""Profiles: the schema (frozen dataclasses), resolution (extends, --set) and validation."""
