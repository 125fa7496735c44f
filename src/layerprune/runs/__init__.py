"""Runs from one YAML: the pipeline (pipeline.py), the settings ledger of its stages (stages.py), the
folder lock (lock.py), the time plan (plan.py) and grids of runs (study/)."""
