"""Publishing a pruned checkpoint: its model card, the expert map image, and the upload to the Hub."""
