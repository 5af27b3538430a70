"""Step configurations as dataclasses, loadable from a TOML recipe (flags override the file)."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, UsageError, did_you_mean

if TYPE_CHECKING:
    from .runtime.compare import Thresholds

from .names import HEAD_FAMILIES, METHODS, METRICS, VIRTUAL_TOKENS


@dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    output: str = ""
    method: str = "head"
    head: str = "softmax"  # the head family a bundle of this run answers with (softmax | ridge, see ridge_head.py)
    val: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.2  # held out, stratified, when there is no --val
    # None means "the method's default" (methods.DEFAULTS)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of all steps spent warming up, then linear decay to 0
    max_grad_norm: float = 1.0
    seed: int = 42
    max_length: int = 128
    pooling: str | None = None
    image_size: int | None = None
    dropout: float = 0.1  # before the head
    backbone_dropout: float | None = None  # None: the model's own dropout rates
    augment: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: list[str] | None = None
    train_layers: int = 2
    unfreeze_every: int = 1
    virtual_tokens: int = VIRTUAL_TOKENS  # prompt, prefix: learned tokens (each costs one position at inference)
    metric: str = "accuracy"
    patience: int | None = None  # epochs without improvement before stopping; None: 10 for head, 3 otherwise
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision through accelerate)
    grad_accum: int = 1  # micro-batches per optimizer step; --batch-size stays the global batch
    nproc: int = 1  # local processes (edgeft train launches them through torchrun)
    folds: int | None = None  # stratified K-fold cross-validation of --data instead of one run (edgeft/folds.py)
    keep_folds: bool = False  # keep each fold's run directory under the output

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method: unknown method '{self.method}'; choose from {', '.join(METHODS)}.{did_you_mean(self.method, METHODS)}")
        if self.head not in HEAD_FAMILIES:
            raise ConfigError(f"head: expected softmax or ridge, got {self.head!r}.")
        if self.metric not in METRICS:
            raise ConfigError(f"metric: unknown metric '{self.metric}'; choose from {', '.join(METRICS)}.{did_you_mean(self.metric, METRICS)}")
        for name in ("epochs", "batch_size", "lora_r", "train_layers", "unfreeze_every", "virtual_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision: expected fp32, bf16 or fp16, got {self.precision!r}.")
        for name in ("grad_accum", "nproc"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}.")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup: expected a fraction in [0, 1), got {self.warmup}.")
        if self.folds is not None and (isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2):
            raise ConfigError(f"folds: expected an integer of at least 2, got {self.folds!r}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: expected at least 1, got {self.keep_checkpoints}.")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def with_method_defaults(self) -> TrainConfig:
        from .methods import DEFAULTS

        d = asdict(self)
        for k, v in DEFAULTS[self.method].items():
            if d.get(k) is None:
                d[k] = v
        if d["patience"] is None:
            d["patience"] = 10 if self.method == "head" else 3
        return TrainConfig(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExportConfig:
    """`edgeft export` (and a recipe's [export] table)."""

    opset: int = 17  # what every built-in target's runtime reads; 9-21 is what the exporter writes
    data: str | None = None  # labelled rows for the parity check; None: the run's validation rows

    def __post_init__(self):
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 9 <= self.opset <= 21:
            raise UsageError(f"--opset: {self.opset} is outside what edgeft exports (9 to 21); "
                             f"{ExportConfig.opset} is the default.")


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file.") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"{path}: cannot read it ({e.strerror or type(e).__name__}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_train_config(path: str | Path, overrides: dict) -> TrainConfig:
    """Options from the file's [train] table (or its top level), then the flags given."""
    doc = read_toml(path) if path else {}
    table = doc.get("train", doc if not any(isinstance(v, dict) for v in doc.values()) else {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [train] must be a table.")
    known = {f.name for f in fields(TrainConfig)}
    values = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{path}: unknown key '{key}' in [train].{did_you_mean(name, known)}")
        _check_type(path, key, name, value)
        values[name] = value
    if path:
        base = Path(path).parent
        for k in ("data", "val", "output"):  # paths in a recipe are relative to the recipe
            if isinstance(values.get(k), str) and not Path(values[k]).is_absolute():
                values[k] = str(base / values[k])
        m = values.get("model")
        if isinstance(m, str) and _exists(base / m) and not Path(m).is_absolute():
            values["model"] = str(base / m)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for required in ("model", "data", "output"):
        if not values.get(required):
            where = f"{path}: " if path else ""
            raise ConfigError(f"{where}--{required} is required (as a flag or in the config's [train] table).")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(f"{path or 'options'}: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _check_type(path, key: str, name: str, value) -> None:
    """Values a person wrote in TOML have the type the option takes (bool is not a number)."""
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    ok = True
    if kind.startswith("str"):
        ok = isinstance(value, str)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("list"):
        ok = isinstance(value, (list, str)) and all(isinstance(v, str) for v in (value if isinstance(value, list) else []))
    if not ok:
        expected = kind.split(" ")[0].replace("str", "a string").replace("int", "an integer").replace(
            "float", "a number").replace("bool", "true or false").replace("list[a string]", "a list of strings")
        raise ConfigError(f"{path}: [train] {key}: expected {expected}, got {value!r}.")


def _check_budget(min_agreement, max_drop) -> None:
    for name, v in (("min_agreement", min_agreement), ("max_drop", max_drop)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
            raise ConfigError(f"{name}: expected a share between 0 and 1, got {v!r}.")


@dataclass(frozen=True)
class QuantizeConfig:
    """`edgeft quantize`: an export folder's backbone -> int8/fp16, gated against the fp32 export."""

    export_dir: str | Path
    mode: str  # a mode of edgeft.quantize.registry (dynamic, static, nncf, fp16, weight-only)
    output: str | Path
    calibration: str | Path | None = None  # None: the training rows, else the validation rows
    text_column: str = "text"
    label_column: str = "label"
    per_channel: bool = True
    search: bool = True  # on a miss: keep the worst nodes in float / NNCF's accuracy control
    overwrite: bool = False
    min_agreement: float | None = None  # None: the precision's budget (runtime.compare.Thresholds.for_precision)
    max_drop: float | None = None  # accuracy units: 0.005 = 0.5 point
    thresholds: Thresholds | None = None  # the whole budget at once; min_agreement/max_drop still apply
    parity_data: str | Path | None = None  # more inputs (labels optional) that judge agreement (certify.parity_inputs)
    uncertified: bool = False  # judge the point estimate, not the 95% lower bound (quantize.json says so)

    def __post_init__(self):
        from .quantize.registry import get

        get(self.mode)  # UsageError naming the modes
        _check_budget(self.min_agreement, self.max_drop)

    def budget(self, precision: str) -> Thresholds:
        return _budget(self.thresholds, precision, self.min_agreement, self.max_drop)


@dataclass(frozen=True)
class BuildConfig:
    """`edgeft build`: a run or model folder -> a verified bundle for one device profile."""

    source: str | Path
    device: str  # a profile name from devices/ or a path to a .toml
    output: str | Path
    calibration: str | Path | None = None  # None: the training rows
    data: str | Path | None = None  # labelled parity rows; None: the run's validation data
    replay: int = 100  # training features kept per class for on-device retraining (0: none)
    archive: bool = False
    overwrite: bool = False
    sign_key: str | Path | None = None
    min_agreement: float | None = None  # None: the precision's budget (runtime.compare.Thresholds.for_precision)
    max_drop: float | None = None  # accuracy units: 0.005 = 0.5 point
    thresholds: Thresholds | None = None  # the whole budget at once; min_agreement/max_drop still apply
    keep_examples: bool = False  # parity.json and reference/items.json keep the rows' texts (image names)
    head: str | None = None  # the head family (HEAD_FAMILIES); None: the run's own, else softmax
    parity_data: str | Path | None = None  # more inputs (labels optional) that judge agreement (certify.parity_inputs)
    uncertified: bool = False  # quantized: judge the point estimate, not the 95% lower bound (the bundle says so)
    emulate: bool | None = None  # ARM64 profiles: the emulated check (edgeft.emulate); None: when it is set up

    def __post_init__(self):
        if self.head is not None and self.head not in HEAD_FAMILIES:
            raise UsageError(f"--head {self.head!r}: expected one of {', '.join(HEAD_FAMILIES)}.")
        if isinstance(self.replay, bool) or not isinstance(self.replay, int) or self.replay < 0:
            raise ConfigError(f"replay: expected a whole number of rows per class (0: none), got {self.replay!r}.")
        if self.sign_key is not None and not Path(self.sign_key).is_file():  # before minutes of building
            raise UsageError(f"{self.sign_key}: no such key file (--sign).")
        _check_budget(self.min_agreement, self.max_drop)

    def budget(self, precision: str) -> Thresholds:
        return _budget(self.thresholds, precision, self.min_agreement, self.max_drop)


def _budget(given, precision: str, min_agreement, max_drop) -> Thresholds:
    from .runtime.compare import Thresholds

    return (given or Thresholds.for_precision(precision)).override(min_agreement=min_agreement,
                                                                     max_accuracy_drop=max_drop)
