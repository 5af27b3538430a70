"""What a device retrain may be told, and every default of it, once.

The CLI (`edgeft device retrain`), the recipe's [retrain] table and the library all read these
defaults from here. Kept apart from retrain.py so the CLI reads them without importing numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


def _positive_int(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")


def _number(name: str, v, low: float, high: float, what: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not low <= v <= high:
        raise ConfigError(f"{name}: expected {what}, got {v!r}.")


@dataclass(frozen=True)
class RetrainConfig:
    add_classes: bool = False  # labels the head does not know become new classes (else an error)
    margin: float = 0.02  # largest accuracy drop allowed on the replay hold-out (0.02 = 2 points)
    keep: int = 5  # head versions kept; older ones are deleted
    text_column: str = "text"
    label_column: str = "label"
    l2: float = 1e-3  # the softmax head's L2 penalty
    max_iter: int = 300  # the softmax head's Adam steps at most (early stopping may end sooner)
    replay_per_class: int | None = None  # replay rows kept per class; None: the bundle's own setting
    holdout: float = 0.25  # of the new samples, per class, held out for early stopping and the guard
    seed: int = 0  # of the hold-out draw

    def __post_init__(self):
        if not isinstance(self.add_classes, bool):
            raise ConfigError(f"add_classes: expected true or false, got {self.add_classes!r}.")
        _number("margin", self.margin, 0.0, 1.0, "a share from 0 to 1 (0.02 = 2 points)")
        _positive_int("keep", self.keep)
        for name in ("text_column", "label_column"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ConfigError(f"{name}: expected a column name, got {v!r}.")
        _number("l2", self.l2, 0.0, math.inf, "a number of 0 or more")
        _positive_int("max_iter", self.max_iter)
        _positive_int("replay_per_class", self.replay_per_class, allow_none=True)
        if not isinstance(self.holdout, (int, float)) or isinstance(self.holdout, bool) or not 0 < self.holdout < 1:
            raise ConfigError(f"holdout: expected a share between 0 and 1, got {self.holdout!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: expected an integer, got {self.seed!r}.")
