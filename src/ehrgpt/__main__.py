"""``python -m ehrgpt ...``, and ``torchrun --nproc_per_node=N -m ehrgpt train|generate ...``."""

from ehrgpt.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="ehrgpt")
