"""Measuring a (pruned) model: generation samples now; perplexity and lm-eval tasks later."""
