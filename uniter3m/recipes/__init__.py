"""Namespace for the recipes in the top-level build_lmdb/, pretrain/ and downstream/ folders."""
