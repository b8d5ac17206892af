"""Models shipped inside the package: ``--model tiny`` is fastft/assets/tiny, made by scripts/make_tiny_model.py."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {"tiny": ASSETS / "tiny"}


def resolve_model(name_or_path: str) -> str:
    """A built-in model's name -> its folder; anything else (a hub id or a local path) is returned unchanged."""
    folder = BUILTIN_MODELS.get(str(name_or_path))
    if folder is None:
        return str(name_or_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"built-in model {name_or_path!r} is missing from {folder}; "
                                f"regenerate it with scripts/make_tiny_model.py")
    return str(folder)
