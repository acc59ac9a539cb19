"""Evaluation knowledge: the corpus table, protocols (folds, selection), metrics and reports (one mean ± std).

See docs/DESIGN.md §2.
"""
