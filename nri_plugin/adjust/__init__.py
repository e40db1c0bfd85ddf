"""Layer 4: resolved request + host snapshot -> container adjustment (pure)."""
