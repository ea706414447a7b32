"""Evaluation: perplexity of a base, its memory and their mixture, and the data it reads."""
