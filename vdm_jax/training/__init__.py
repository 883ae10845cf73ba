"""Training: the train state, the optimiser and the training loop."""
