"""clipline training (see its issue; README.md Status)."""
