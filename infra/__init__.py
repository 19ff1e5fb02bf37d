"""clipline infra (see its issue; README.md Status)."""
