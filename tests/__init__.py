"""The test suite, one folder per room of the package (docs/DESIGN.md §2) plus cross-cutting ones
(cli, faults, gpu); shared fixtures in conftest.py, shared helpers in tests.support."""
