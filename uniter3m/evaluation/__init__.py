"""Evaluation knowledge: the corpus table, protocols (folds, selection), metrics, linear baselines and reports
(one mean ± std).

See docs/DESIGN.md §2.
"""
