"""``moeslim validate``: the pruned model against the original, structure first, then side by side on held-out text."""
