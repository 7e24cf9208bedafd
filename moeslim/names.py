"""The file names moeslim reads and writes, in one place: a checkpoint's, a pruned output's and a statistics
folder's."""

from __future__ import annotations

# a checkpoint (read from the source, written into the output)
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"  # a checkpoint in one file
INDEX_NAME = "model.safetensors.index.json"  # the shard index of a checkpoint in several files
SHARD_PATTERN = r"model-\d+-of-\d+\.safetensors"  # the shards moeslim writes (transformers' naming)

# what a pruned output holds besides the checkpoint
PLAN_NAME = "moeslim_plan.json"
CARD_NAME = "README.md"  # the model card
VALIDATION_NAME = "validation.json"  # the validation report; the model card shows it
IMAGE_NAME = "expert_map.png"  # the card's picture of the kept experts

# a statistics folder (``moeslim calibrate --out``)
STATS_JSON = "stats.json"
STATS_ARRAYS = "stats.safetensors"
