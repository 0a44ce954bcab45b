"""`python -m spo_ray.serve`: see spo_ray/serve/cli.py."""

from spo_ray.serve.cli import main

main()
