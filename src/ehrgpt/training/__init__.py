"""Pretraining: records -> samples (:mod:`.data`), packed rows (:mod:`.packing`), targets of
the heads (:mod:`.targets`), the loop with checkpoints and resume (:mod:`.trainer`) and
data-parallel runs under ``torchrun`` (:mod:`.distributed`). The entry point is
:func:`ehrgpt.pipelines.train.train` (``ehrgpt train``)."""
