"""Checkpoint surgery: from a plan to a pruned folder, byte ranges copied, nothing decoded."""
