"""`python -m layerprune ...` (also what `accelerate launch -m layerprune` runs)."""

from layerprune.cli import main

main()
