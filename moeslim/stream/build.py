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
    from moeslim.engine.tiny import architecture_of

    name = architecture_of(getattr(config, "model_type", ""))
    if name is not None and (cls := getattr(transformers, name, None)) is not None:
        return cls
    return transformers.AutoModelForCausalLM
