"""Zero-shot prediction: risks from sampled futures (docs/method.md section 12)."""
