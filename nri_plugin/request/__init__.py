"""Layer 2: the request model. Pure functions, no I/O."""
