"""ehrgpt: CEHR-GPT for OMOP CDM and MEDS data."""

__version__ = "0.1.0"
