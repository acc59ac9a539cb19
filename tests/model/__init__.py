"""The model (uniter3m.model): the backbone, the one load path, convert, Hugging Face export."""
