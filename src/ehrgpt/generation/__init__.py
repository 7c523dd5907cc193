"""Generation: constrained sampling of patient timelines (docs/method.md section 8)."""
