"""``python -m gradlens``: the command line, also as torchrun runs it
(``torchrun --nproc-per-node N -m gradlens compare --tensor-parallel N``)."""

from gradlens.cli import main

if __name__ == "__main__":
    main()
