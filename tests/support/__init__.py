"""Helpers shared by tests and benchmarks (importable as ``support``: pyproject's pytest ``pythonpath``)."""
