"""What this machine can do: the compute dtype decision (compute.py), the environment report (env.py) and
time estimates before long work (estimate.py)."""
