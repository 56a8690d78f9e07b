"""Bindings layer: finds, builds and loads the compiled kernels (vdproj_ext._C) for the ops layer.

Imports nothing else from vdproj_ext; everything above it reaches the kernels through here.
"""
from .loader import load, source_dir, status

__all__ = ["load", "source_dir", "status"]
