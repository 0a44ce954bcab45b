"""Prompt sources, the Arrow schema of pair rows, and tokenization for the learner."""
