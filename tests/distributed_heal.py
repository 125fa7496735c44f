"""Run by test_distributed.py under `accelerate launch --num_processes 2 --cpu`: heal a tiny model with DDP."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

from layerprune.data.instructions import Example, tokenize_examples  # noqa: E402
from layerprune.finetune import HealConfig, heal  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
rows = tokenize_examples([Example(f"say {w}", "", f"{w} {w}") for w in ["cat", "dog", "sun", "sky"] * 4],
                         tiny_tokenizer(), max_length=64)
config = HealConfig(method="partial", learning_rate=1e-2, max_steps=4, batch_size=2, effective_batch_size=4,
                    warmup_steps=0, bf16=False)
result = heal(tiny_model("llama"), rows, config, tokenizer=tiny_tokenizer(), work_dir=out / "work")
digest = hashlib.sha256()
for name, tensor in sorted(result.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().float().numpy().tobytes())
(out / f"rank{rank}.json").write_text(json.dumps({
    "sha256": digest.hexdigest(), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    "steps": result.steps, "accumulation": result.notes["gradient_accumulation"],
    "losses": [c["loss"] for c in result.loss_curve],
}))
