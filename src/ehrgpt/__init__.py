"""ehrgpt: CEHR-GPT for OMOP CDM and MEDS data.

Importing ``ehrgpt`` registers the model with Hugging Face's Auto classes (when transformers
is imported, see :mod:`ehrgpt.hf_auto`), so a trained model folder loads with
``transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR)``.
"""

__version__ = "0.1.0"

from ehrgpt.hf_auto import register_on_import as _register_on_import

_register_on_import()
