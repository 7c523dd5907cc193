"""One module per command: each orchestrates its stage and returns a result whose ``rows()``
the CLI renders as the summary table.

- :mod:`.prepare`: OMOP or MEDS data -> MEDS, vocabulary, tokens (``ehrgpt prepare``);
- :mod:`.train`: pretraining (``ehrgpt train``, also under ``torchrun -m ehrgpt train``);
- :mod:`.generate`: synthetic patients as MEDS and OMOP (``ehrgpt generate``);
- :mod:`.demo`: the chain on the bundled Eunomia data (``ehrgpt demo``);
- :mod:`.labels`: ACES task -> MEDS labels per split (``ehrgpt labels``);
- :mod:`.embed`: one embedding per label row (``ehrgpt embed``);
- :mod:`.probe`, :mod:`.baseline`, :mod:`.finetune`: held_out metrics of a linear probe, the
  count baseline and a fine-tuned model (``ehrgpt probe | baseline | finetune``), sharing
  :mod:`.predict_common`; :mod:`.output` builds a command's folder atomically.
- :mod:`.evaluate`: fidelity, utility and privacy of synthetic patients (``ehrgpt evaluate``).
"""
