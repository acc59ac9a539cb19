"""Evaluation (uniter3m.evaluation): metrics, protocols, the EmoDB and RAVDESS corpora."""
