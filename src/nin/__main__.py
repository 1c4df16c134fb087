"""`python -m nin` and `torchrun -m nin` run the command-line interface."""

from nin.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
