"""Building blocks every part of layerprune shares: the base of the stage configs (config_base.py) and
the registries of metrics, healing methods and architecture families (registry.py)."""
