"""Choosing the layers: ranking scores under constraints (ranking.py), size/speed/quality budgets
(budgets.py), the drop-set search and its paths (search.py), one-shot and iterative pruning - the one prune
loop (strategies.py), the trade-off curve (curve.py), and score runs with their files (scores.py)."""
