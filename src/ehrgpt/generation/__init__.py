"""Generation: constrained sampling of patient timelines (SPEC section 6)."""
