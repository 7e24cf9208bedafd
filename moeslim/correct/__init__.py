"""The correction after pruning: its least-squares fit (``fit.py``) and the pass that writes it (``run.py``)."""
