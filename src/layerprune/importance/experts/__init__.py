"""Expert importance: one score per expert of every MoE layer, ORIGINAL indices, higher = keep.

registry.py: the metric registry and `compute_expert_scores`; routing.py: the calibration pass that records
what the router really sends each expert; metrics.py: the built-in metrics."""
