"""What this machine can do, and nothing about the work: the compute dtype decision (compute.py), the devices and
their memory (devices.py), how fast a model runs here (speed.py), timing on a device (timing.py) and the
environment report (env.py)."""
