"""Study grids: a run YAML plus a `grid:` of lists -> one run per combination, sharing work, -> paper tables.

    grid:
      metric: [reverse-order, taylor]        # prune.metric
      heal_method: [lora, partial]          # heal[0].method ("none" = no healing)
      strategy: [one-shot, "1:4:8", "1:1:8"]

Any dotted key of the run config also works (`prune.calibration.n_samples`, `heal.0.learning_rate`). Every
setting is validated before anything runs. Settings live in `<out>/settings/<name>/` (ordinary run
folders); scores (once per metric), pruned models (once per selection) and the original's evaluation
are made once in `<out>/shared/` and linked in. With `report: {similarity: true}` a last stage writes
`similarity.json` (linear CKA of the final models). The end product is `study.md/.csv/.html` (rows =
settings, columns = tasks, Avg Acc, perplexities, parameters, decode speedup) and plots, rendered from
the study folder's files by layerprune.report.study_report.

grid.py        loading, expanding and executing the grid
similarity.py  the CKA stage: hidden states of every final model -> similarity.json
"""

from layerprune.runs.study.grid import Study, is_study, load_study, setting_name

__all__ = ["Study", "is_study", "load_study", "setting_name"]
