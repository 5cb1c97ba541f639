"""Sparse CPU kernels (see backend.py, layouts.py)."""
