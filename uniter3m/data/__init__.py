"""Databases, tokenisation, datasets, token-bucket batching and task mixing."""
