"""The single-stream transformer and its weights: config, embeddings, encoder, heads, pooling readouts, LoRA,
weight I/O (`io`, the one load path), key conversion and export. Never imports train/."""
