"""Pretraining objectives and masking (uniter3m.tasks)."""
