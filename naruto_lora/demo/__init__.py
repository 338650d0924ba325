"""The built-in demo world: the tiny random model, the toy world, the style score."""
