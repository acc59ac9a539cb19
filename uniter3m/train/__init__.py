"""Distributed backend, mixed precision, optimiser and schedule, checkpoints, the loop."""
