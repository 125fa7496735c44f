"""Read documents from a bundled corpus, a user file, or a hub dataset.

Bundled corpora are gzip copies inside the package (see resources/data/MANIFEST.md
for sources and licences), so a fresh clone works offline.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from layerprune.errors import LayerpruneError, first_line
from layerprune.files.user_files import iter_jsonl, read_text


@dataclass(frozen=True)
class BundledCorpus:
    name: str
    filename: str
    kind: str  # "jsonl" (field "text") | "lines" (one sentence per line) | "wikitext" (blank-line layout)
    description: str
    hub: tuple[str, str | None, str, str]  # dataset id, config, split, text field
    documents: tuple[int, int] | None = None  # a slice [start, stop) of the file's documents


# The bundled C4 sample is split once: documents 0-1199 (`c4`) feed calibration, selection and healing;
# documents 1200-1499 (`c4-heldout`) are reserved for evaluation, so healing on `c4` is judged on text it
# never saw.
C4_HELDOUT_START = 1200

BUNDLED_CORPORA: dict[str, BundledCorpus] = {
    c.name: c
    for c in [
        BundledCorpus("c4", "c4-validation.jsonl.gz", "jsonl", "C4 en validation sample, documents 0-1199",
                      ("allenai/c4", "en", "validation", "text"), (0, C4_HELDOUT_START)),
        BundledCorpus("c4-heldout", "c4-validation.jsonl.gz", "jsonl",
                      "C4 en validation sample, documents 1200-1499 (evaluation only)",
                      ("allenai/c4", "en", "validation", "text"), (C4_HELDOUT_START, 1500)),
        BundledCorpus("wikitext2", "wikitext2-test.txt.gz", "wikitext", "WikiText-2 raw test set",
                      ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text")),
        BundledCorpus("ptb", "ptb-test.txt.gz", "lines", "Penn Treebank test set (Mikolov text-only)",
                      ("ptb_text_only", None, "test", "sentence")),
    ]
}


def bundled_path(filename: str) -> Path:
    return Path(str(files("layerprune").joinpath("resources", "data", filename)))


def read_bundled_lines(name: str) -> list[str]:
    """The raw lines of a bundled text corpus (wikitext/ptb), as in the upstream file."""
    corpus = BUNDLED_CORPORA[name]
    with gzip.open(bundled_path(corpus.filename), "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def _documents_from_lines(lines: list[str], kind: str) -> list[str]:
    if kind == "lines":
        return [line for line in lines if line.strip()]
    # wikitext: a document starts at each top-level heading " = Title = "
    docs: list[list[str]] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= ="):
            docs.append([])
        if not docs:
            docs.append([])
        if stripped:
            docs[-1].append(line.strip())
    return ["\n".join(d) for d in docs if d]


def read_texts(source: str, *, field: str = "text") -> list[str]:
    """Documents of a source: bundled name, .txt (blank-line separated) / .jsonl path, or hub id."""
    if source in BUNDLED_CORPORA:
        corpus = BUNDLED_CORPORA[source]
        if corpus.kind == "jsonl":
            with gzip.open(bundled_path(corpus.filename), "rt", encoding="utf-8") as f:
                texts = [json.loads(line)["text"] for line in f if line.strip()]
            return texts[slice(*corpus.documents)] if corpus.documents else texts
        return _documents_from_lines(read_bundled_lines(source), corpus.kind)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, field)
    if path.exists():
        raise LayerpruneError(f"{source} is not a file")
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _read_hub(source, field)
    raise LayerpruneError(
        f"unknown text source {source!r}: not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), file or hub dataset id"
    )


def _read_file(path: Path, field: str) -> list[str]:
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix == ".jsonl":
        texts = []
        for number, row in iter_jsonl(path, "text file"):
            if field not in row:
                raise LayerpruneError(f"{path}:{number} has no field {field!r} (fields: {', '.join(row) or 'none'})")
            texts.append(str(row[field]))
        return texts
    content = read_text(path, "text file")
    return [block.strip() for block in content.split("\n\n") if block.strip()]


def _read_hub(dataset_id: str, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise LayerpruneError("reading a hub dataset needs the `datasets` package: pip install datasets") from err
    try:
        data = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # datasets raises many types; the user needs one line
        raise LayerpruneError(f"could not load hub dataset {dataset_id!r}: {first_line(err)}") from err
    if field not in data.column_names:
        raise LayerpruneError(f"hub dataset {dataset_id!r} has no field {field!r} (fields: {data.column_names})")
    return [str(t) for t in data[field]]
