"""`python -m secateurs ...`: the command line, as torchrun starts it (`torchrun --nproc-per-node N -m secateurs
distill ...`)."""

from secateurs.cli import main

if __name__ == "__main__":  # not when a spawned worker process (prepare-data's tokenizers) imports this module
    main()
