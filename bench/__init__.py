"""Benchmarks: each figure measured next to its baseline in the same run (`python -m bench`, or `./tb bench`)."""
