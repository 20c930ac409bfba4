"""Axis maps: for every parameter of a family, which tensor axis is which width.

A family is described once, here, by data: the Subset/Expand engine in
``method.operators``, the parameter counter and the shape solver in ``shapes``
and the importance statistics in ``method.ranking`` are generic over it.
Adding a family is adding an entry to ``FAMILIES``.

Axis labels:
  hidden    the residual stream (shared by embeddings, norms, projections)
  ffn       the MLP's inner width (per layer)
  q / kv    query heads / key-value heads, flattened as heads * head_dim
  qkv       GPT-2's fused [q | k | v] projection (multi-head attention)
  hqkv      GPT-NeoX's fused per-head [q_h, k_h, v_h] projection
  vocab     the vocabulary (never changes inside a chain)
  None      untouched (positions, head_dim-sized q/k norms)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import CBDError

_AXES_CACHE: dict[tuple[str, str], tuple] = {}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_prefix: str  # parameters under "<prefix>.<i>." belong to layer i
    config_keys: dict[str, str]  # shape field -> config.json key
    axes: tuple[tuple[str, tuple], ...]  # (regex on the name, axis labels)
    norms: str  # regex: gains of RMSNorm/LayerNorm over the hidden axis
    norm_kind: str = "rms"  # "rms" or "layer"
    tied_attention_width: bool = False  # hidden == heads * head_dim
    ffn_multiple: int | None = None  # ffn == ffn_multiple * hidden
    eps_key: str = "rms_norm_eps"  # config key of the norms' epsilon
    residual_writers: str | None = None  # LayerNorm families: tensors that write the residual stream

    def axes_of(self, name: str) -> tuple:
        local = layer_local_name(self, name)[1]
        key = (self.name, local)
        if key in _AXES_CACHE:
            return _AXES_CACHE[key]
        for pattern, labels in self.axes:
            if re.fullmatch(pattern, local):
                _AXES_CACHE[key] = labels
                return labels
        raise CBDError(
            f"parameter '{name}' is not in the {self.name} axis map; "
            f"the checkpoint does not look like a plain {self.name} model"
        )

    def writes_residual(self, name: str) -> bool:
        local = layer_local_name(self, name)[1]
        return self.residual_writers is not None and re.fullmatch(self.residual_writers, local) is not None

    def is_norm(self, name: str) -> bool:
        return re.fullmatch(self.norms, layer_local_name(self, name)[1]) is not None


def layer_local_name(family: Family, name: str) -> tuple[int | None, str]:
    """Split 'model.layers.3.mlp.up_proj.weight' into (3, 'mlp.up_proj.weight')."""
    prefix = family.layers_prefix + "."
    if name.startswith(prefix):
        idx, _, rest = name[len(prefix):].partition(".")
        return int(idx), rest
    return None, name


_LLAMA_AXES = (
    (r"model\.embed_tokens\.weight", ("vocab", "hidden")),
    (r"lm_head\.weight", ("vocab", "hidden")),
    (r"model\.norm\.weight", ("hidden",)),
    (r"self_attn\.q_proj\.weight", ("q", "hidden")),
    (r"self_attn\.q_proj\.bias", ("q",)),
    (r"self_attn\.[kv]_proj\.weight", ("kv", "hidden")),
    (r"self_attn\.[kv]_proj\.bias", ("kv",)),
    (r"self_attn\.o_proj\.weight", ("hidden", "q")),
    (r"self_attn\.o_proj\.bias", ("hidden",)),
    (r"self_attn\.[qk]_norm\.weight", (None,)),
    (r"mlp\.(gate|up)_proj\.weight", ("ffn", "hidden")),
    (r"mlp\.down_proj\.weight", ("hidden", "ffn")),
    (r"(input|post_attention)_layernorm\.weight", ("hidden",)),
)
_LLAMA_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "ffn": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab": "vocab_size",
}
_LLAMA_NORMS = r"model\.norm\.weight|(input|post_attention)_layernorm\.weight"


def _linear(prefix: str, out: str, inp: str) -> tuple:
    """The axis-map rows of a biased linear layer: weight (out, in), bias (out,)."""
    return ((prefix + r"\.weight", (out, inp)), (prefix + r"\.bias", (out,)))


# GPT-2 and GPT-NeoX: LayerNorm, one fused q/k/v projection (attention width tied to hidden), 4x FFN
_LAYER_NORM_FUSED_QKV = {"norm_kind": "layer", "tied_attention_width": True, "ffn_multiple": 4}


_LLAMA = Family(name="llama", model_types=("llama", "mistral", "qwen2"), layers_prefix="model.layers",
                config_keys=_LLAMA_KEYS, axes=_LLAMA_AXES, norms=_LLAMA_NORMS)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "qwen3": replace(_LLAMA, name="qwen3", model_types=("qwen3",)),  # the same axis map as llama
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        layers_prefix="model.h",
        config_keys={"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "vocab": "vocab_size"},
        axes=(
            (r"model\.wte\.weight", ("vocab", "hidden")),
            (r"model\.wpe\.weight", (None, "hidden")),
            (r"model\.ln_f\.(weight|bias)", ("hidden",)),
            (r"ln_[12]\.(weight|bias)", ("hidden",)),
            *_linear(r"attn\.c_attn", "qkv", "hidden"),
            *_linear(r"attn\.c_proj", "hidden", "q"),
            *_linear(r"mlp\.c_fc", "ffn", "hidden"),
            *_linear(r"mlp\.c_proj", "hidden", "ffn"),
        ),
        norms=r"model\.ln_f\.weight|ln_[12]\.weight",
        eps_key="layer_norm_epsilon",
        residual_writers=r"model\.wte\.weight|model\.wpe\.weight|(attn|mlp)\.c_proj\.(weight|bias)",
        **_LAYER_NORM_FUSED_QKV,
    ),
    "gpt_neox": Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_prefix="model.h",
        config_keys={"layers": "num_hidden_layers", "hidden": "hidden_size", "ffn": "intermediate_size",
                     "heads": "num_attention_heads", "vocab": "vocab_size"},
        axes=(
            (r"model\.embed_(in|out)\.weight", ("vocab", "hidden")),
            (r"model\.final_layer_norm\.(weight|bias)", ("hidden",)),
            (r"(input|post_attention)_layernorm\.(weight|bias)", ("hidden",)),
            *_linear(r"attention\.query_key_value", "hqkv", "hidden"),
            *_linear(r"attention\.dense", "hidden", "q"),
            *_linear(r"mlp\.dense_h_to_4h", "ffn", "hidden"),
            *_linear(r"mlp\.dense_4h_to_h", "hidden", "ffn"),
        ),
        norms=r"model\.final_layer_norm\.weight|(input|post_attention)_layernorm\.weight",
        eps_key="layer_norm_eps",
        residual_writers=r"model\.embed_in\.weight|attention\.dense\.(weight|bias)|mlp\.dense_4h_to_h\.(weight|bias)",
        **_LAYER_NORM_FUSED_QKV,
    ),
}


def family_of(config: dict) -> Family:
    """The family of a config.json (by ``model_type``)."""
    model_type = config.get("model_type")
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise CBDError(
        f"model_type '{model_type}' is not supported; supported: {', '.join(known)}"
    )
