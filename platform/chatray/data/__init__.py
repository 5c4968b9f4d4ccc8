"""Dialogue data: readers, chat template, tokenizers, and ``prepare`` -> Parquet datasets.

Import the submodules directly (``chatray.data.prepare``, ``chatray.data.dataset``, ...): this package
imports nothing heavy so that the CLI stays fast.
"""

__all__: list[str] = []
