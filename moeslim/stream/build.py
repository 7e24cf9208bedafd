"""The model class that loads a checkpoint: the one its config names in ``architectures`` when transformers
defines it (VLM wrappers, families outside the causal-LM auto table), else the causal-LM auto class."""

from __future__ import annotations

from typing import Any


def model_class(config: Any) -> Any:
    """The transformers class to build or load ``config``'s model with."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and hasattr(cls, "_from_config"):
            return cls
    name = architecture_of(getattr(config, "model_type", ""))
    if name is not None and (cls := getattr(transformers, name, None)) is not None:
        return cls
    return transformers.AutoModelForCausalLM


def architecture_of(model_type: str) -> str | None:
    """The class that loads a family's checkpoints: causal LM, else image-text-to-text, else multimodal LM.

    A wrapper family (vision / audio + text) whose causal-LM entry is the text-only class (it takes the text
    sub-config) is loaded by its image-text or multimodal class: that is what its checkpoints are saved from."""
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:  # the lazy mapping has no working .get
        sub_configs = getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {}
    except KeyError:
        sub_configs = {}
    text_class = sub_configs.get("text_config")
    found = []
    for table in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    ):
        names = getattr(modeling_auto, table, {})
        if model_type in names:
            found.append(str(names[model_type]))
    for name in found:
        cls = getattr(transformers, name, None)
        if text_class is None or getattr(cls, "config_class", None) is not text_class:
            return name
    return found[0] if found else None
