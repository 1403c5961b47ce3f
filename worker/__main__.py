"""`python -m worker`: the same as the `worker` command."""

from .cli import main

main()
