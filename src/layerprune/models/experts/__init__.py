"""Mixture-of-experts blocks: where each family keeps its experts and router (anatomy.py), what its routing
requires of a cut (routing.py), and removing experts so that the result is a stock model (surgery.py)."""
