"""MoE families: the table moeslim reads at run time (``table.py``, ``families.json``) and the derivation that
writes it from transformers' model definitions (``derive.py``, ``tiny.py``; never imported at run time)."""
