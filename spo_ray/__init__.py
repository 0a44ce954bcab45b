"""spo_ray: Self-Play Preference Optimization (Wu et al., 2024, arXiv 2405.00675) on Ray."""

__version__ = "0.1.0"
