"""clipline eval (see its issue; README.md Status)."""
