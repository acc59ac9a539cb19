"""Build time: turning files and recordings into databases (sources, media decoding, extractors, ASR, builders).

Imported by the `build_lmdb` recipes and `predict`; never by training code. See docs/DESIGN.md §2.
"""
