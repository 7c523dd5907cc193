"""One module per command: each orchestrates its stage and returns a result whose ``rows()``
the CLI renders as the summary table.

- :mod:`.prepare`: OMOP or MEDS data -> MEDS, vocabulary, tokens (``ehrgpt prepare``);
- :mod:`.train`: pretraining (``ehrgpt train``, also under ``torchrun -m ehrgpt train``);
- :mod:`.generate`: synthetic patients as MEDS and OMOP (``ehrgpt generate``);
- :mod:`.evaluate`: fidelity, utility and privacy of synthetic patients (``ehrgpt evaluate``);
- :mod:`.demo`: the chain on the bundled Eunomia data (``ehrgpt demo``).
"""
