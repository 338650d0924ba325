"""Export writers (kohya, diffusers, peft, merged) and the reload check."""
