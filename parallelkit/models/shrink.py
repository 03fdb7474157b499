"""A shrunken copy of an architecture, from its transformers config: the same model class and
structure (biases, norms, tied embeddings, rope settings, the GQA ratio) at test size, built in
float64 with one seed, so every rank builds the same weights. ``check-plan`` runs plans on it.
"""

from __future__ import annotations

import copy
import json

import torch

# Where configs keep each size, by the architectures' naming: the first name present is used.
SIZE_NAMES = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim"),
    "positions": ("max_position_embeddings", "n_positions"),
    "vocab": ("vocab_size",),
}
LAYERS, HEAD_DIM, VOCAB = 2, 16, 128


def load_config(config):
    """A ``transformers.PretrainedConfig`` from a path to config.json, a dict or a config."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return copy.deepcopy(config)
    if not isinstance(config, dict):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the config {config!r}: {error}") from None
    kwargs = dict(config)
    if "model_type" not in kwargs:
        raise ValueError("the config has no 'model_type'; give a transformers config.json "
                         "(as save_pretrained writes it)")
    try:
        return transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    except (ValueError, KeyError) as error:
        raise ValueError(f"transformers cannot build this config: {error}") from None


def shrink_config(config, tp: int, seq_len: int):
    """The same architecture at test size: ``LAYERS`` layers, ``HEAD_DIM``-wide heads, kv heads
    = tp (the GQA ratio kept), hidden = heads·HEAD_DIM, ffn = 2·hidden, vocab ``VOCAB``, no
    dropout, SDPA. Head counts that do not divide tp are kept: ``parallelize`` names them."""
    d = config.to_dict()
    names = {size: next((n for n in options if d.get(n) is not None), None)
             for size, options in SIZE_NAMES.items()}
    if names["heads"] is None or names["hidden"] is None:
        raise ValueError(f"cannot shrink a {type(config).__name__}: it has none of "
                         f"{SIZE_NAMES['heads']} or {SIZE_NAMES['hidden']}")
    heads = d[names["heads"]]
    kv = d[names["kv_heads"]] if names["kv_heads"] else heads
    old_head_dim = d.get("head_dim") or d[names["hidden"]] // heads
    if heads % tp == 0 and kv % tp == 0 and heads % kv == 0:
        kv_small = tp if tp > 1 else min(kv, 2)
        heads, kv = kv_small * (heads // kv), kv_small
    layers = d.get(names["layers"])
    for key, value in list(d.items()):
        if isinstance(value, list) and layers and len(value) == layers:  # per layer: layer_types
            d[key] = value[:LAYERS]
        elif ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            d[key] = 0.0
        elif key.endswith("_token_id") and value is not None:  # ids must exist in the vocab
            d[key] = [v % VOCAB for v in value] if isinstance(value, list) else value % VOCAB
    hidden = heads * HEAD_DIM
    d.update({names["heads"]: heads, names["hidden"]: hidden, "use_cache": False, "dtype": None})
    d.update({names[k]: v for k, v in (("kv_heads", kv), ("layers", LAYERS), ("vocab", VOCAB),
                                       ("ffn", 2 * hidden)) if names[k]})
    if names["positions"]:
        d[names["positions"]] = max(d[names["positions"]], seq_len)
    if d.get("head_dim") is not None:
        d["head_dim"] = HEAD_DIM
    if d.get("rotary_dim"):  # rotary width in features (GPT-J): keep its share of the head
        d["rotary_dim"] = max(2, d["rotary_dim"] * HEAD_DIM // old_head_dim // 2 * 2)
    _shrink_rope(d)
    # float64 needs SDPA (eager where the model has none, e.g. soft-capping) and eager experts
    # (grouped_mm takes float32/16 only)
    sdpa = getattr(_model_class(config), "_supports_sdpa", True)
    return type(config).from_dict(d, attn_implementation="sdpa" if sdpa else "eager",
                                  experts_implementation="eager")


def _shrink_rope(d: dict) -> None:
    """Per-frequency lists (longrope's short/long factors) have one entry per rotary pair."""
    key = "rope_parameters" if isinstance(d.get("rope_parameters"), dict) else "rope_scaling"
    rope = d.get(key)
    if not isinstance(rope, dict):
        return
    share = rope.get("partial_rotary_factor") or d.get("partial_rotary_factor") or 1.0
    pairs = max(1, int(HEAD_DIM * share) // 2)
    d[key] = {k: [v[i * len(v) // pairs] for i in range(pairs)] if isinstance(v, list) else v
              for k, v in rope.items()}


def build_model(config) -> torch.nn.Module:
    """``config.architectures[0]`` from transformers (else the causal-LM auto class), float64,
    seeded: the same weights on every rank."""
    import transformers

    cls = _model_class(config)
    torch.manual_seed(0)
    model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(
        config)
    return model.to(torch.float64)


def _model_class(config):
    import transformers

    name = (config.architectures or [None])[0]
    return getattr(transformers, name, None) if name else None
