"""Planning before work: each stage's time (estimate.py, run_time.py) and memory (memory.py), and the job plan of `layerprune plan` (job.py)."""
