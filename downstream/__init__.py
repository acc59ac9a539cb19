"""Recipes: see docs/DESIGN.md §2 (installed as uniter3m.recipes.downstream)."""
