"""Layer 3: the host driver, read under configurable roots (never on the CreateContainer hot path)."""
