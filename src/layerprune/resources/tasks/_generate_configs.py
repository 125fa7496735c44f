"""Write the per-subject MMLU / CMMLU task YAMLs from lm-eval's stock ones (run once per lm-eval upgrade).

    python src/layerprune/resources/tasks/_generate_configs.py

Each stock subject file (`lm_eval/tasks/mmlu/default/mmlu_<subject>.yaml`, `lm_eval/tasks/cmmlu/cmmlu_<subject>.yaml`)
gives its description (part of the zero-shot prompt) and, for MMLU, its category tag. Our files keep both
and swap the hub dataset for the bundled one (`dataset_kwargs: {task_file, split, subject}`). Like lm-eval's own
`_generate_configs.py`, this is a maintenance script, not imported at run time.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).parent


def _stock_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _write(path: Path, config: dict, quoted: bool = True) -> None:
    with open(path, "w", encoding="utf-8") as f:
        style = '"' if quoted else None  # quoted like lm-eval's generated subject files
        yaml.dump(config, f, allow_unicode=True, default_style=style, width=float("inf"), sort_keys=False)


def generate(family: str) -> int:
    """family: mmlu | cmmlu. Returns the number of subject files written."""
    stock = _stock_dir() / ("mmlu/default" if family == "mmlu" else "cmmlu")
    out = HERE / family
    out.mkdir(exist_ok=True)
    for old in [*out.glob(f"lp_{family}_*.yaml"), *out.glob(f"_lp_{family}*.yaml")]:
        old.unlink()
    count = 0
    for path in sorted(stock.glob(f"{family}_*.yaml")):
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        if cfg.get("include") != "_default_template_yaml":
            continue  # e.g. group files
        subject = cfg["dataset_name"]
        ours = {
            "dataset_kwargs": {"task_file": family, "split": "test", "subject": subject},
            "description": cfg["description"],
        }
        if "tag" in cfg:
            ours["tag"] = f"lp_{cfg['tag']}"
        ours["include"] = "_default_template_yaml"
        ours["task"] = f"lp_{cfg['task']}"
        if "task_alias" in cfg:
            ours["task_alias"] = cfg["task_alias"]
        _write(out / f"lp_{path.name}", ours)
        count += 1
    for path in sorted(stock.glob(f"_{family}*.yaml")):  # groups: same members and aggregation, prefixed
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        cfg["group"] = f"lp_{cfg['group']}"
        cfg["task"] = [f"lp_{t}" for t in cfg["task"]]
        _write(out / f"_lp{path.name}", cfg, quoted=False)
    return count


if __name__ == "__main__":
    for name in ("mmlu", "cmmlu"):
        print(f"{name}: {generate(name)} subject files")
