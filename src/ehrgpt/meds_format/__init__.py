"""The MEDS 0.4 format as ehrgpt writes and reads it: column names and codes
(:mod:`~ehrgpt.meds_format.columns`), dataset writing, splitting and checking
(:mod:`~ehrgpt.meds_format.dataset`)."""
