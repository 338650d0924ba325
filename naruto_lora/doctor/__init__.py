"""``nlora doctor``: machine facts, checks, the profile recommendation."""
