"""`edgeft demo`: the built-in example recipe, end to end, offline."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "maintenance"


def run_demo(output: str | Path, force: bool = False) -> dict:
    recipe = EXAMPLE / "recipe.toml"
    if not recipe.exists():
        raise UsageError(f"{recipe}: the example is missing; run the demo from a clone of the edgeft repository.")
    from .recipe import run_recipe

    return run_recipe(recipe, force=force, output=output)
