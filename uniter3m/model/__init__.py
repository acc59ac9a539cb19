"""The single-stream transformer: embeddings, encoder, heads (never imports train/)."""
