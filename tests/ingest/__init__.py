"""Build time (uniter3m.ingest): text, feature and media databases, extractors, detectors, ASR, inspect."""
