"""Calibration: exact routing statistics, collected one decoder layer at a time."""
