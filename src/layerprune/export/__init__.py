"""Serving a pruned model elsewhere: GGUF export with llama.cpp's converter (gguf.py) and running GGUF
files through llama.cpp's bindings (llamacpp.py)."""

from layerprune.export.gguf import QUANTS, export_gguf  # noqa: F401  (layerprune.export.export_gguf, as before)
