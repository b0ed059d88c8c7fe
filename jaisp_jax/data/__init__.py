"""Data: band-aware tile reading and validation, the GalSim sky simulator, TFDS + grain."""
