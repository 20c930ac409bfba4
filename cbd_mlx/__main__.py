"""``python -m cbd_mlx ...`` is the ``cbd-mlx`` command line."""

from .cli import main

main()
