"""chatray: fine-tune and serve GPT-2 family dialogue models on Ray."""

__version__ = "0.1.0"
__all__ = ["__version__"]
