"""Helpers the test folders share; fixtures live in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
