"""Device kinds: one module per kind, the registry, pins and the hardware they make up."""
