"""Training rows as the Trainer (and the healing probe) batch them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.models.tokens import IGNORE_INDEX


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.rows[index], "row": index}  # the row number finds its cached teacher targets


@dataclass
class PadCollator:
    """Right-pad input_ids with pad_id, labels with IGNORE_INDEX; build the attention mask."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if all("row" in r for r in rows):
            batch["row"] = torch.tensor([r["row"] for r in rows])
        return batch
