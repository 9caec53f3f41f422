"""Small bundled tasks for the benchmarks (data shipped inside the package, no downloads)."""

from .digits import DigitsData, load_digits, make_digits, make_mlp

__all__ = ["DigitsData", "load_digits", "make_digits", "make_mlp"]
