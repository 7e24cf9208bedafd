"""Running a checkpoint layer by layer: the one loop over decoder layers (``loop.py``) and what it needs."""
