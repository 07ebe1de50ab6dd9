"""`python -m tuneship` (and `torchrun -m tuneship train ...`) run the CLI."""

from tuneship.cli import main

if __name__ == "__main__":
    main(prog_name="tuneship")
