"""matplotlib set up for writing files, shared by every module that draws a plot."""

from __future__ import annotations

from layerprune.files.outputs import write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path):
    """The figure as a PNG at `path`, written atomically and never through a symlink (outputs.write_bytes):
    run and study folders are filled in place."""
    import io
    from pathlib import Path

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return write_bytes(Path(path), buffer.getvalue())
