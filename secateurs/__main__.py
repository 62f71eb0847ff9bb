"""`python -m secateurs ...`: the command line, as torchrun starts it (`torchrun --nproc-per-node N -m secateurs
distill ...`)."""

from secateurs.cli import main

main()
