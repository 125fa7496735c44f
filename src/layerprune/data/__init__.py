"""Text sources: bundled corpora, user files, hub datasets; calibration and instruction sets."""
