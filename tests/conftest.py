import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and timings stay stable when the machine is busy.
torch.set_num_threads(1)


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny llama with its tokenizer saved as a stock model folder (modules may define their own)."""
    from tiny_models import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def corpus_file(tmp_path):
    """tiny_models.CORPUS written to text.txt (calibration and training text of the tiny models)."""
    from tiny_models import CORPUS

    path = tmp_path / "text.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures saved during a test, in order: plot tests assert what was drawn (lines, image
    cells, labels), not only that a PNG file appeared."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    return figures
