"""Training: optimiser/schedule, checkpoints, the training loop."""
