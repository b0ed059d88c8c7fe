"""Training system: train state, sharding, step, loop, checkpoints."""
