"""The one home for transformers internals: tiny models built from a family's own config class, and the
MoE layout of each family derived from its model definition (``derive.py``), kept as committed data."""
