"""The small trained models shipped inside edgelm, usable as ``embedded:gpt2`` and ``embedded:gpt-neo``."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODELS = {"gpt2": ASSETS / "models" / "gpt2", "gpt-neo": ASSETS / "models" / "gpt-neo"}
TOKENIZER_DIR = ASSETS / "tokenizer"
PREFIX = "embedded:"


def resolve_model_argument(model: str) -> str:
    if not model.startswith(PREFIX):
        return model
    name = model[len(PREFIX):]
    if name not in EMBEDDED_MODELS:
        raise InputError(f"no embedded model '{name}'; choose one of "
                         + ", ".join(PREFIX + n for n in EMBEDDED_MODELS))
    return str(EMBEDDED_MODELS[name])
