"""LoRA (`model.lora_rank` > 0): train low-rank adapters on every linear layer, the base frozen.

Through transformers' PEFT integration, so a model keeps its class (`add_adapter`): the same
forward, `disable_adapters()` for the reference pi0 (no second copy of the base held). What
leaves the learner is always a plain HF state dict with the adapters merged in
(`hf_state_dict`): the generators, `policy/` and `from_pretrained` never see an adapter.
Checkpoints hold only the trainable tensors (`AdapterView`) and the base's path."""

from __future__ import annotations

import contextlib

import torch

LORA_SUFFIXES = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def add_lora(model, rank: int, head: str | None = None):
    """LoRA of `rank` (alpha = 2·rank) on every linear layer but the output one; `head` (a
    scalar model's `score`) is trained whole. Only the adapters (and head) require grad."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                                 modules_to_save=[head] if head else None))
    return model


def has_lora(model) -> bool:
    return bool(getattr(model, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_off(model):
    """The base model: pi0 for the reference log-probs."""
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict under its plain HF names, adapters merged: W + (alpha/r)·B·A for
    every adapted layer (computed, the base left untouched), the trained copy of a saved head.
    A model without LoRA: its own state dict."""
    sd = model.state_dict()
    if not has_lora(model):
        return sd
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, value in sd.items():
        if any(s in key for s in LORA_SUFFIXES) or ".original_module." in key:
            continue
        if ".base_layer." in key:
            path, leaf = key.split(".base_layer.")
            if leaf == "weight":
                with torch.no_grad():
                    value = value + layers[path].get_delta_weight("default").to(value.dtype)
            key = f"{path}.{leaf}"
        out[key.replace(".modules_to_save.default", "")] = value
    return out


def merged_copy(model):
    """A plain HF model (same class and config, no adapters) holding `hf_state_dict(model)`:
    what `save_model` writes for a LoRA-trained model."""
    plain = type(model)(model.config)
    plain.load_state_dict(hf_state_dict(model), strict=True)
    return plain.to(next(model.parameters()).dtype)


class AdapterView(torch.nn.Module):
    """The trainable tensors of a LoRA model (the same Parameter objects) as a module of their
    own, so the checkpoint format stores them, and their optimizer state, and nothing else."""

    def __init__(self, model):
        super().__init__()
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", ":"), p)
