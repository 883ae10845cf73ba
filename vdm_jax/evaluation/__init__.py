"""Evaluators of a trained model: the bound, the probability-flow ODE, samples."""
