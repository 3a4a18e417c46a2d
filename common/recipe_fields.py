"""How a recipe section declares and checks its fields; data/config.py and cspresnet/recipe.py
both write their sections with these."""
import dataclasses
from typing import Any, Callable, Tuple, Union

from .errors import RecipeError

KeyName = Callable[[str], str]  # a field's name -> how a message names it


def setting(default: Any, affects_results: bool = True, only_for: Union[str, Tuple[str, ...], None] = None) -> Any:
    """affects_results=False: it changes how a run goes (where it reads, how fast, when it stops or saves), never
    a number it trains. only_for: it applies only when its section's `name` is this or one of these."""
    return dataclasses.field(default=default, metadata={"affects_results": affects_results, "only_for": only_for})


def recipe_key(section: str) -> KeyName:
    return lambda name: f"recipe key '{section}.{name}'" if section else f"recipe key '{name}'"


def require(ok: bool, key: str, allowed: str, value: Any) -> None:
    """Refuse a value that type-checks but cannot work, naming the key and what it allows."""
    if not ok:
        raise RecipeError(f"{key} must be {allowed}, got {value!r}")
