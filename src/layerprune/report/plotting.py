"""matplotlib set up for writing files, shared by every module that draws a plot."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
