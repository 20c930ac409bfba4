"""GGUF (llama family) -> an mlx-lm model directory.

Weights are dequantized with ``mx.dequantize``; Q/K rows are un-permuted from
llama.cpp's RoPE layout back to the Hugging Face layout mlx-lm uses; the
tokenizer inside the GGUF becomes a Hugging Face ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from .arch.families import family_of
from .arch.shapes import context_length, shape_of
from .errors import CBDError
from .save import read_json, save_weights, weights_sha256

GGUF_GROUP_SIZE = 32
NAME_MAP = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# llama.cpp pre-tokenizer names whose regex is GPT-2's with single digits split
DIGIT_SPLIT_PRE = {"smollm", "llama-bpe", "llama3", "smaug-bpe", "qwen2", "dbrx"}
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def _scalar(meta: dict, key: str, default=None):
    v = meta.get(key, default)
    if isinstance(v, mx.array):
        v = v.item() if v.size == 1 else np.array(v).tolist()
    return v


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (its convert script's ``permute``)."""
    out_dim = w.shape[0]
    if n_head <= 0 or out_dim % (2 * n_head):
        raise CBDError(f"a GGUF Q/K tensor has {out_dim} rows, which {n_head} heads cannot split; the file's metadata "
                       "does not match its tensors")
    half = out_dim // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(weights: dict, base: str) -> mx.array:
    w = weights[base + ".weight"]
    if base + ".scales" not in weights:
        return w.astype(mx.float32)
    scales, biases = weights[base + ".scales"], weights[base + ".biases"]
    in_features = scales.shape[-1] * GGUF_GROUP_SIZE
    bits = w.shape[-1] * 32 // in_features
    return mx.dequantize(w, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits).astype(
        mx.float32
    )


BAD_TENSOR_TYPES = ("F64", "I8", "I16", "I32", "I64")  # not weights: integers would be read as float bits


def check_gguf(path: Path):
    """Parse a GGUF file's header, metadata and tensor table with llama.cpp's
    pure-Python reader and check every tensor's offset and size against the
    file, before any native loader sees it. Returns the reader."""
    import gguf

    bad = f"GGUF {path} is corrupt or truncated; fetch it again"
    try:
        r = gguf.GGUFReader(str(path))
        size = Path(path).stat().st_size
        align = int(_field(r, "general.alignment", 32) or 32)
        for t in r.tensors:
            if t.data_offset < 0 or t.n_bytes < 0 or t.data_offset + t.n_bytes > size:
                raise CBDError(f"{bad} (tensor {t.name} ends past the end of the file)")
            if (t.data_offset - r.data_offset) % align:
                raise CBDError(f"{bad} (tensor {t.name} is not aligned to {align} bytes)")
            if t.tensor_type.name in BAD_TENSOR_TYPES:
                raise CBDError(f"GGUF {path}: tensor {t.name} is {t.tensor_type.name}; model weights must be "
                               "float (F32, F16, BF16) or quantized")
            if any(int(d) <= 0 or int(d) > 1 << 24 for d in t.shape.tolist()) or len(t.shape) > 4:
                raise CBDError(f"{bad} (tensor {t.name} has shape {t.shape.tolist()})")
    except CBDError:
        raise
    except Exception as e:  # noqa: BLE001 - the reader raises many kinds on damaged files
        raise CBDError(f"{bad} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return r


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(config, fp32 weights in mlx-lm names, raw metadata) of a llama GGUF."""
    check_gguf(path)
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError on bad files and unsupported quant types
        if "gguf_tensor_to_f16" in str(e):  # k-quants etc.: llama.cpp's reader dequantizes them
            return read_gguf_any(path)
        raise CBDError(f"cannot read GGUF {path}: {e}; the file is corrupt or truncated, fetch it again") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        return read_gguf_any(path)
    config = gguf_config(arch, lambda k: _scalar(meta, k), "output.weight" in raw)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    weights = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in raw})
    for base in bases:
        parts = base.split(".")
        if base + ".weight" not in raw or any(k.startswith(base + ".") and k.rsplit(".", 1)[1] not in
                                               ("weight", "scales", "biases") for k in raw):
            raise CBDError(f"GGUF {path}: unexpected tensor '{base}'")
        hf = _hf_name(parts, NAME_MAP, config["num_hidden_layers"])
        if hf is None:
            raise CBDError(f"GGUF {path}: unexpected tensor '{base}'")
        w = np.array(_dequantize(raw, base))
        if hf.endswith("q_proj"):
            w = unpermute_rope(w, n_head)
        elif hf.endswith("k_proj"):
            w = unpermute_rope(w, n_kv)
        weights[hf + ".weight"] = w
    return config, weights, meta


def _hf_name(parts: list[str], name_map: dict, layers: int) -> str | None:
    """mlx-lm's name of a GGUF tensor ('blk.3.attn_q' -> 'model.layers.3.self_attn.q_proj'), None when
    the name is not one of a model's (an unknown part, a layer index that is not a layer of this model)."""
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < layers \
            and parts[2] in name_map:
        return f"model.layers.{int(parts[1])}.{name_map[parts[2]]}"
    if len(parts) == 1 and parts[0] in name_map:
        return name_map[parts[0]]
    return None


def tokenizer_from_gguf(meta: dict, out_dir: Path) -> None:
    """Write tokenizer.json / tokenizer_config.json built from GGUF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise CBDError(
            f"GGUF tokenizer model '{meta.get('tokenizer.ggml.model')}' is not supported (only BPE 'gpt2')"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = np.array(meta.get("tokenizer.ggml.token_type", mx.ones(len(tokens)))).tolist()
    vocab = {t: i for i, t in enumerate(tokens)}
    try:  # merges of tokens the list lacks, and the like: the tokenizers library's own words, on one line
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
        raise CBDError(f"GGUF tokenizer metadata is damaged ({e}); fetch the file again") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre", "") in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]

    def tok_at(key):
        idx = _scalar(meta, key)
        return tokens[int(idx)] if idx is not None and int(idx) < len(tokens) else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tok_at("tokenizer.ggml.bos_token_id"),
        eos_token=tok_at("tokenizer.ggml.eos_token_id"),
        unk_token=tok_at("tokenizer.ggml.unknown_token_id"),
        pad_token=tok_at("tokenizer.ggml.padding_token_id"),
        additional_special_tokens=special,
        clean_up_tokenization_spaces=False,
    )
    if "tokenizer.chat_template" in meta:
        fast.chat_template = meta["tokenizer.chat_template"]
    fast.save_pretrained(str(out_dir))


def gguf_to_model_dir(path: Path, out_dir: Path) -> None:
    """Convert a llama or gemma3 GGUF into an mlx-lm model directory (fp32 safetensors)."""

    config, weights, meta = read_gguf(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(out_dir / "model.safetensors", weights)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if meta.get("tokenizer.ggml.model") == "llama":
        spm_tokenizer_from_gguf(meta, out_dir)
    else:
        tokenizer_from_gguf(meta, out_dir)
    prov = {"kind": "converted", "source": str(path), "weights_sha256": weights_sha256(out_dir)}
    (out_dir / "cbd.json").write_text(json.dumps(prov, indent=2))


GEMMA3_NAME_MAP = NAME_MAP | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GEMMA_NORM_SHIFT = 1.0  # llama.cpp stores Gemma RMSNorm gains as 1 + w


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def check_gguf_tokenizer(get) -> None:
    """The tokenizer metadata a conversion reads (``get(key)``): tokens, merges of a BPE model, special token
    ids that name tokens of the list."""
    tokens, model = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.model")
    if not tokens or not model:
        raise CBDError("GGUF metadata lacks the tokenizer (tokenizer.ggml.model / tokens); convert the model "
                       "with a tokenizer")
    bad = None
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        bad = "tokenizer.ggml.tokens is not a list of strings"
    elif model == "gpt2" and not (isinstance(get("tokenizer.ggml.merges"), list) and all(
            isinstance(m, str) and len(m.split(" ")) == 2 for m in get("tokenizer.ggml.merges"))):
        bad = "tokenizer.ggml.merges is missing or not a list of 'a b' pairs"
    elif model == "llama" and not (isinstance(get("tokenizer.ggml.scores"), list)
                                   and len(get("tokenizer.ggml.scores")) == len(tokens)):
        bad = "tokenizer.ggml.scores does not give one score per token (a SentencePiece tokenizer needs them)"
    types = get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != len(tokens)):
        bad = bad or "tokenizer.ggml.token_type does not give one type per token"
    for key in ("bos", "eos", "unknown", "padding"):
        idx = get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(tokens)):
            bad = bad or f"tokenizer.ggml.{key}_token_id {idx!r} is not one of its {len(tokens)} tokens"
    if bad:
        raise CBDError(f"GGUF tokenizer metadata is damaged: {bad}; fetch the file again")


def gguf_config(arch: str, get, has_output: bool) -> dict:
    """config.json of a llama or gemma3 GGUF from its metadata (``get(key)``
    returns a value or None; ``has_output``: an untied output matrix)."""
    def g(k, d=None, whole=True):
        v = get(f"{arch}.{k}")
        v = d if v is None else v
        if (v is None or isinstance(v, (str, bytes, list, bool)) or not np.isfinite(float(v)) or float(v) <= 0
                or (whole and float(v) != int(v))):
            raise CBDError(f"GGUF metadata {arch}.{k} is {v!r}, not a positive {'whole ' if whole else ''}number; "
                           "the file is damaged or not a model")
        return v

    if not get("tokenizer.ggml.tokens") or not get("tokenizer.ggml.model"):
        raise CBDError("GGUF metadata lacks the tokenizer (tokenizer.ggml.model / tokens); convert the model "
                       "with a tokenizer")
    n_head, hidden = int(g("attention.head_count")), int(g("embedding_length"))
    config = {
        "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": n_head, "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "num_hidden_layers": int(g("block_count")), "rope_theta": float(g("rope.freq_base", 10000.0, whole=False)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "vocab_size": int(g("vocab_size", len(get("tokenizer.ggml.tokens") or []))),
        "tie_word_embeddings": not has_output,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
    }
    check_gguf_tokenizer(get)
    if arch == "gemma3":
        head_dim = int(g("attention.key_length", hidden // n_head))
        return config | {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "head_dim": head_dim,
                         "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6, whole=False)),
                         "sliding_window": int(g("attention.sliding_window", 512)), "sliding_window_pattern": 6,
                         "query_pre_attn_scalar": head_dim, "rope_local_base_freq": 10000.0}
    config |= {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
               "head_dim": int(g("rope.dimension_count", hidden // n_head)),
               "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5, whole=False))}
    shape_of(family_of(config), config)  # dimensions bounded and consistent, fields in range
    return config


def read_gguf_any(path: Path) -> tuple[dict, dict[str, np.ndarray], dict]:
    """(config, fp32 weights, metadata) through llama.cpp's ``gguf`` reader
    (every quantization type, incl. k-quants); llama and gemma3."""
    import gguf

    r = check_gguf(path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "gemma3"):
        raise CBDError(f"GGUF {path} holds a '{arch}' model; supported GGUF architectures: llama, gemma3")
    meta = {k: _field(r, k) for k in r.fields if k.startswith(("tokenizer.", "general.", f"{arch}."))}
    config = gguf_config(arch, meta.get, "output.weight" in {t.name for t in r.tensors})
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    name_map = GEMMA3_NAME_MAP if arch == "gemma3" else NAME_MAP
    weights = {}
    for t in r.tensors:
        parts = t.name.removesuffix(".weight").split(".")
        key = parts[-1]
        hf = _hf_name(parts, name_map, config["num_hidden_layers"]) if t.name.endswith(".weight") else None
        if hf is None:
            raise CBDError(f"GGUF {path}: unexpected tensor '{t.name}'")
        hf += ".weight"
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape.tolist())])  # GGUF lists dims fastest-first
        if arch == "gemma3" and key.endswith("norm"):
            w = w - GEMMA_NORM_SHIFT
        if arch == "llama" and key in ("attn_q", "attn_k"):
            w = unpermute_rope(w, n_head if key == "attn_q" else n_kv)
        weights[hf] = w
    return config, weights, meta


def spm_tokenizer_from_gguf(meta: dict, out_dir: Path) -> None:
    """A SentencePiece ``tokenizer.model`` (and Hugging Face files) rebuilt from
    a GGUF's 'llama' (SentencePiece BPE) vocabulary, as for Gemma."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import AutoTokenizer

    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    m.normalizer_spec.remove_extra_whitespaces = False
    for i, (t, sc, ty) in enumerate(zip(tokens, scores, types)):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(sc), int(ty)
    for key, attr in (("unknown", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"), ("padding", "pad_id")):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        setattr(m.trainer_spec, attr, int(idx) if idx is not None else -1)
    (out_dir / "tokenizer.model").write_bytes(m.SerializeToString())
    tcfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            "add_eos_token": False, "clean_up_tokenization_spaces": False}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None:
            tcfg[name] = tokens[int(idx)]
    if meta.get("tokenizer.chat_template"):
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    AutoTokenizer.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))  # adds tokenizer.json


LLAMA_CPP_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")  # quantized by llama.cpp itself
GGUF_TYPES = ("f16", "q8_0", "q5_0", "q4_1", "q4_0") + LLAMA_CPP_TYPES  # what `export --gguf` writes
HF_TO_GGUF = {v: k for k, v in NAME_MAP.items()}
# per family: llama.cpp's architecture and its tensor names for the family's local names
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3", "gpt2": "gpt2", "gpt_neox": "gptneox"}
GGUF_TENSORS = {
    "llama": HF_TO_GGUF,
    "qwen3": HF_TO_GGUF | {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"},
    "gpt2": {"model.wte": "token_embd", "model.wpe": "position_embd", "model.ln_f": "output_norm",
             "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "gptneox": {"model.embed_in": "token_embd", "model.embed_out": "output", "model.final_layer_norm": "output_norm",
                "input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
}
LAYER_PREFIXES = ("model.layers.", "model.h.")


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face Q/K rows -> llama.cpp's RoPE layout (inverse of ``unpermute_rope``)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, arch: str = "llama") -> str:
    """mlx-lm/Hugging Face parameter name -> llama.cpp tensor name."""
    table = GGUF_TENSORS[arch]
    base, _, kind = hf.rpartition(".")
    for prefix in LAYER_PREFIXES:
        if base.startswith(prefix):
            i, rest = base[len(prefix):].split(".", 1)
            return f"blk.{i}.{table[rest]}.{kind}"
    return f"{table[base]}.{kind}"


def pre_tokenizer_type(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name ("tokenizer.ggml.pre") for a byte-level
    BPE tokenizer.json, read from its pre-tokenizer: GPT-2's regex ("gpt-2"),
    the same with single digits split first (SmolLM's "smollm"), or Qwen2's
    split pattern ("qwen2")."""

    pre = read_json(Path(model_dir) / "tokenizer.json", "tokenizer").get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and r"\p{N}" in json.dumps(parts[0].get("pattern", {})) and "ByteLevel" in kinds:
        return "qwen2"
    raise CBDError(f"the tokenizer in {model_dir} has a pre-tokenizer llama.cpp is not known to match ({kinds}); "
                   "GGUF export supports GPT-2, SmolLM and Qwen2 style byte-level BPE tokenizers")


def _bpe_vocab(model_dir: Path) -> tuple[list[str], list[int], list[str], dict]:
    """(tokens, token types, merges, special ids) of a byte-level BPE tokenizer.json."""

    data = read_json(Path(model_dir) / "tokenizer.json", "tokenizer")
    if data.get("model", {}).get("type") != "BPE":
        raise CBDError("GGUF export supports byte-level BPE tokenizers (tokenizer.json model 'BPE') only")
    vocab = dict(data["model"]["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    types = [TOKEN_TYPE_CONTROL if t in added and added[t].get("special") else
             TOKEN_TYPE_USER_DEFINED if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    cfg_path = Path(model_dir) / "tokenizer_config.json"

    tcfg = read_json(cfg_path, "tokenizer") if cfg_path.is_file() else {}
    special = {k: vocab.get(tcfg.get(f"{k}_token") if isinstance(tcfg.get(f"{k}_token"), str) else None)
               for k in ("bos", "eos", "unk", "pad")}
    return tokens, types, merges, special | {"chat_template": tcfg.get("chat_template")}


def _qkv_blocks(w: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's per-head [q_h, k_h, v_h] rows -> [all q | all k | all v] (llama.cpp's layout)."""
    return w.reshape(n_head, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def _tensor_for(arch: str, name: str, v: np.ndarray, config: dict) -> np.ndarray:
    """A weight in llama.cpp's layout: llama's Q/K rows permuted for its RoPE,
    GPT-NeoX's fused QKV regrouped."""
    n_head = int(config.get("num_attention_heads") or config.get("n_head"))
    if arch == "llama" and name.endswith("q_proj.weight"):
        return permute_rope(v, n_head)
    if arch == "llama" and name.endswith("k_proj.weight"):
        return permute_rope(v, int(config.get("num_key_value_heads", n_head)))
    if arch == "gptneox" and "query_key_value" in name:
        return _qkv_blocks(v, n_head)
    return v


def _add_hparams(w, arch: str, config: dict) -> None:
    """The architecture's hyperparameters, complete (llama.cpp reads head
    sizes from key/value_length when hidden != heads x head_dim); widths as
    mlx-lm builds the model (gpt_neox's FFN is 4 x hidden whatever the config says)."""

    g = config.get
    ffn = shape_of(family_of(config), config).ffn
    hidden = int(g("hidden_size") or g("n_embd"))
    n_head = int(g("num_attention_heads") or g("n_head"))
    head_dim = int(g("head_dim") or hidden // n_head)
    w.add_context_length(context_length(config) or 2048)
    w.add_embedding_length(hidden)
    w.add_block_count(int(g("num_hidden_layers") or g("n_layer")))
    w.add_head_count(n_head)
    if arch in ("llama", "qwen3"):
        w.add_feed_forward_length(ffn)
        w.add_head_count_kv(int(g("num_key_value_heads") or n_head))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(g("rope_theta") or 10000.0))
        w.add_layer_norm_rms_eps(float(g("rms_norm_eps") or 1e-6))
    elif arch == "gpt2":
        w.add_feed_forward_length(ffn)
        w.add_head_count_kv(n_head)
        w.add_layer_norm_eps(float(g("layer_norm_epsilon") or 1e-5))
    else:  # gptneox
        w.add_feed_forward_length(ffn)
        w.add_head_count_kv(n_head)
        w.add_rope_dimension_count(int(float(g("rotary_pct") or 1.0) * head_dim))
        w.add_rope_freq_base(float(g("rotary_emb_base") or 10000.0))
        w.add_parallel_residual(bool(g("use_parallel_residual", True)))
        w.add_layer_norm_eps(float(g("layer_norm_eps") or 1e-5))


def llama_cpp_quantize(src: Path, dst: Path, qtype: str, threads: int | None = None) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``):
    its K-quant mixes, which keep sensitive tensors (embeddings, some FFN
    down projections) at higher precision and fall back per tensor where rows
    do not fit 256-wide blocks."""
    import ctypes
    import os

    try:
        import llama_cpp
    except ImportError:
        raise CBDError(f"--gguf {qtype} uses llama.cpp's own quantizer: install llama-cpp-python "
                       "(`bash scripts/test.sh` builds it), or choose q8_0/q5_0/q4_1/q4_0") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads or os.cpu_count() or 1
    if not _QUIET_LOG:  # llama.cpp prints a line per tensor otherwise; the callback must outlive the call
        _QUIET_LOG.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
    llama_cpp.llama_log_set(_QUIET_LOG[0], ctypes.c_void_p())
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise CBDError(f"llama.cpp could not quantize {src.name} to {qtype} (code {rc}); try another --gguf type")


_QUIET_LOG: list = []


def write_gguf(config: dict, weights: dict[str, np.ndarray], model_dir: Path, path: Path, qtype: str = "f16",
               name: str = "cbd-mlx") -> None:
    """A llama.cpp GGUF of a llama, qwen3, gpt2 or gpt_neox model, written with
    llama.cpp's own ``gguf`` package: ``qtype`` (f16, q8_0, q5_0, q4_1, q4_0)
    for 2-D weights whose rows fit its blocks (else f16); norms and biases f32.
    The llama.cpp types (Q4_K_M, Q5_K_M, Q6_K, ...) are written as f16 and
    quantized by llama.cpp itself."""
    import gguf

    arch = GGUF_ARCH.get(config.get("model_type"))
    if arch is None:
        raise CBDError(f"GGUF export supports {', '.join(sorted(GGUF_ARCH))}, not '{config.get('model_type')}'")
    if qtype not in GGUF_TYPES:
        raise CBDError(f"--gguf must be one of {', '.join(GGUF_TYPES)}")
    if qtype in LLAMA_CPP_TYPES:
        f16 = path.with_name(f".{path.name}.f16")
        try:
            write_gguf(config, weights, model_dir, f16, "f16", name)
            llama_cpp_quantize(f16, path, qtype)
        finally:
            f16.unlink(missing_ok=True)
        return
    tokens, types, merges, special = _bpe_vocab(model_dir)
    pre = pre_tokenizer_type(model_dir)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    _add_hparams(w, arch, config)
    w.add_vocab_size(len(tokens))
    ftype = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q5_0": "MOSTLY_Q5_0", "q4_1": "MOSTLY_Q4_1",
             "q4_0": "MOSTLY_Q4_0"}[qtype]
    w.add_file_type(getattr(gguf.LlamaFileType, ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if special.get(key) is not None:
            add(int(special[key]))
    w.add_add_bos_token(False)
    if special.get("chat_template"):
        w.add_chat_template(special["chat_template"])
    qt = None if qtype == "f16" else getattr(gguf.GGMLQuantizationType, qtype.upper())
    for k in sorted(weights):
        v = _tensor_for(arch, k, np.asarray(weights[k], dtype=np.float32), config)
        if v.ndim == 1:
            w.add_tensor(gguf_name(k, arch), v)
        elif qt is not None and v.shape[-1] % 32 == 0:
            w.add_tensor(gguf_name(k, arch), gguf.quants.quantize(v, qt), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(k, arch), v.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_perplexity(path: Path, tokens: list[int], seq_len: int = 512, threads: int | None = None) -> dict:
    """Perplexity of ``tokens`` under a GGUF file as llama.cpp itself computes
    the logits (through llama-cpp-python), over the same non-overlapping
    windows as ``evaluate.perplexity``; plus llama.cpp's prompt tokens/s."""
    import time

    try:
        import llama_cpp
    except ImportError:
        raise CBDError("llama-cpp-python is not installed (`bash scripts/test.sh` builds it)") from None
    n = len(tokens) // seq_len
    if n == 0:
        raise CBDError(f"need at least {seq_len} tokens, got {len(tokens)}")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seq_len, logits_all=True, verbose=False,
                          n_threads=threads, n_batch=seq_len)
    total, count, t0 = 0.0, 0, time.time()
    for i in range(n):
        window = tokens[i * seq_len:(i + 1) * seq_len]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:seq_len], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= logp[np.arange(seq_len - 1), window[1:]].sum()
        count += seq_len - 1
    secs = time.time() - t0
    return {"ppl": float(np.exp(total / count)), "tokens": count, "tokens_per_s": n * seq_len / secs}


def llama_cpp_generate(path: Path, prompt: str, max_tokens: int = 100, temp: float = 0.0, top_p: float = 1.0,
                       seed: int | None = None, chat: bool = True, threads: int | None = None) -> dict:
    """Text from a GGUF file through llama.cpp (llama-cpp-python): the chat
    template of the file when ``chat`` and it has one, else the raw prompt.
    Returns text, prompt and generated token counts and tokens/s."""
    import time

    try:
        import llama_cpp
    except ImportError:
        raise CBDError("running a .gguf needs llama-cpp-python (`pip install llama-cpp-python`, or "
                       "`bash scripts/test.sh`, which builds it)") from None
    check_gguf(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, verbose=False, n_threads=threads,
                          seed=seed if seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
    t0 = time.time()
    if chat and llm.metadata.get("tokenizer.chat_template"):
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         temperature=temp, top_p=top_p)
        text = out["choices"][0]["message"]["content"]
    else:
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=temp, top_p=top_p)
        text = out["choices"][0]["text"]
    secs = time.time() - t0
    usage = out["usage"]
    return {"text": text, "prompt_tokens": usage["prompt_tokens"], "tokens": usage["completion_tokens"],
            "tokens_per_s": usage["completion_tokens"] / max(secs, 1e-9), "seconds": secs}
