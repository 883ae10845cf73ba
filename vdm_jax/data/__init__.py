"""Data: the data sets and the deterministic, sharded input pipeline."""
