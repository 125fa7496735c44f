"""Healing under `accelerate launch` with 2 CPU processes (gloo): both ranks end with the same weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate launcher not installed")
@pytest.mark.integration
def test_two_process_ddp_run_agrees_on_the_final_weights(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    script = Path(__file__).with_name("distributed_heal.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        # --multi_gpu starts torchrun; without GPUs the Trainer falls back to CPU processes over gloo.
        [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["sha256"] == ranks[1]["sha256"]
    # effective batch 4 = 2 processes x micro-batch 2: no gradient accumulation needed
    assert ranks[0]["accumulation"] == 1 and ranks[0]["steps"] == 4
    assert ranks[0]["losses"][-1] < ranks[0]["losses"][0]
