"""`python -m tmkt` (also what `torchrun -m tmkt` runs)."""

from tmkt.cli import main

main()
