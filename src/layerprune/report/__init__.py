"""Human views of result files: markdown tables and matplotlib plots."""
