"""Evaluation of synthetic patients against real ones (``ehrgpt evaluate``).

- :mod:`.patients`: MEDS -> per-patient summaries, visits and sparse code matrices;
- :mod:`.fidelity`: prevalence, co-occurrence, KL, distributions, real-vs-synthetic classifier;
- :mod:`.utility`: train on synthetic / test on real (TSTR) against train on real (TRTR);
- :mod:`.privacy`: membership inference, adversarial accuracy, attribute inference,
  re-identification, exact copies, over a blockwise nearest-neighbour search;
- :mod:`.plots`, :mod:`.report`: the self-contained HTML report.

The orchestration is :mod:`ehrgpt.pipelines.evaluate`; the method is docs/method.md, section 11.
"""
