"""Fine-tuning methods: which parameters train, and when.

head     backbone frozen; features cached once, the head trains on the cache
lora     peft LoRA adapters on the backbone (targets per architecture) + the head
ia3      peft (IA)3: learned rescaling vectors on keys, values and the feed-forward input (1x1
         convolutions' outputs on CNNs) + the head; folds into the weights like LoRA
full     everything
bitfit   every bias + the head
partial  the top N layers (+ whatever sits above them, e.g. a pooler) + the head
gradual  starts with the head, unfreezes one more layer from the top every K epochs
prompt   peft prompt tuning: learned virtual-token embeddings before the text + the head (text models)
prefix   peft prefix tuning: learned keys and values in every attention layer + the head (text models)
         neither folds into the weights: the export carries them as constants (prompts.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import UsageError, did_you_mean
from .models import TaskModel, layer_groups
from .names import METHODS, PROMPT_METHODS, VIRTUAL_TOKENS

# peft wrappers a run keeps unmerged; merge folds them into the weights (prompt, prefix: into a
# backbone that carries them as constants, prompts.PromptedTextBackbone)
ADAPTERS = ("lora", "ia3", "prompt", "prefix")

# Defaults per method: (body lr, head lr, epochs, batch). Measured on MiniLM (STACK.md):
# LoRA learns best with a separate, larger lr for the fresh head (1e-2) than for the
# adapters (1e-3); full fine-tuning needs a small body lr or it forgets its pretraining.
DEFAULTS = {
    # head epochs cost almost nothing on cached features: many small steps, stopped early;
    # no body lr: the backbone does not train
    "head": dict(head_lr=3e-3, epochs=100, batch_size=32),
    "lora": dict(lr=1e-3, head_lr=1e-2, epochs=5, batch_size=16),
    # (IA)3 trains a few thousand scaling factors from 1: the (IA)3 paper's and peft's examples
    # use lr 3e-3; the vectors need a larger step than LoRA's matrices to move the features
    "ia3": dict(lr=3e-3, head_lr=1e-2, epochs=5, batch_size=16),
    "full": dict(lr=5e-5, head_lr=1e-3, epochs=4, batch_size=16),
    "bitfit": dict(lr=1e-3, head_lr=1e-2, epochs=5, batch_size=16),
    "partial": dict(lr=1e-4, head_lr=1e-2, epochs=5, batch_size=16),
    "gradual": dict(lr=1e-4, head_lr=1e-2, epochs=6, batch_size=16),
    # prompt learning moves a few thousand embedding values: large steps, as in peft's examples
    # (prompt tuning 3e-2) and P-tuning v2 (prefixes 5e-3 to 1e-2)
    "prompt": dict(lr=3e-2, head_lr=1e-2, epochs=5, batch_size=16),
    "prefix": dict(lr=1e-2, head_lr=1e-2, epochs=5, batch_size=16),
}

# (IA)3 where peft has no table for the model type: the key and value projections (first naming
# scheme that matches) and the feed-forward block's output layer, whose input (the activations) it scales
IA3_ATTENTION = (("key", "value"), ("k_proj", "v_proj"), ("k_lin", "v_lin"), ("k", "v"))
IA3_FFN_OUT = ("output.dense", "mlp.fc2", "fc2", "ffn.lin2", "wo", "down_proj")

# Attention projections LoRA adapts by default, per naming scheme (first match wins).
LORA_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v"))


@dataclass
class Plan:
    method: str
    trainable: set[str]  # every parameter that trains at some point of the run
    stages: list[set[str]] = field(default_factory=list)  # gradual: what trains per stage
    every: int = 1  # gradual: epochs per stage
    lora_targets: list[str] = field(default_factory=list)

    def trainable_at(self, epoch: int) -> set[str]:
        if not self.stages:
            return self.trainable
        return self.stages[min(epoch // max(self.every, 1), len(self.stages) - 1)]


def default_lora_targets(backbone: nn.Module) -> list[str]:
    leaves = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    for pair in LORA_TARGETS:
        if set(pair) <= leaves:
            return list(pair)
    # CNNs: the pointwise (1x1) convolutions carry most of the weights and adapt well.
    convs = [
        n for n, m in backbone.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1
    ]
    if convs:
        return convs
    linears = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears
    raise UsageError("--method lora: no Linear or 1x1 Conv2d layers to adapt in this model.")


def ia3_targets(backbone: nn.Module) -> tuple[list[str], list[str]]:
    """(target modules, feed-forward modules) for (IA)3: peft's own table for the model type,
    else key/value projections and the feed-forward output by their usual names (IA3_ATTENTION,
    IA3_FFN_OUT), else a CNN's 1x1 convolutions."""
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    config = next((m.config for m in backbone.modules() if hasattr(m, "config")), None)
    kind = getattr(config, "model_type", None)
    if kind in TARGETS:
        return list(TARGETS[kind]), list(FEEDFORWARD.get(kind, []))
    linears = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    leaves = {n.rsplit(".", 1)[-1] for n in linears}
    for pair in IA3_ATTENTION:
        ffn = [f for f in IA3_FFN_OUT if any(n == f or n.endswith("." + f) for n in linears)]
        if set(pair) <= leaves and ffn:
            return [*pair, ffn[0]], [ffn[0]]
    convs = [n for n, m in backbone.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    if convs:
        return convs, []
    raise UsageError(f"--method ia3: peft has no (IA)3 targets for this model ({kind or type(backbone).__name__}: "
                     "no key/value projections, no 1x1 convolutions); use --method lora or bitfit.")


def _check_targets(backbone: nn.Module, targets: list[str]) -> None:
    names = [n for n, m in backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise UsageError(
                f"--lora-targets: no Linear or Conv2d layer named '{t}' in this model "
                f"(layer names: {', '.join(leaves)}).{did_you_mean(t, leaves)}"
            )


def apply(model: TaskModel, method: str, *, lora_r=8, lora_alpha=16, lora_dropout=0.1,
          lora_targets=None, train_layers=2, unfreeze_every=1, virtual_tokens=VIRTUAL_TOKENS) -> Plan:
    """Freeze and wrap `model` in place for `method`; return what trains when."""
    if method not in METHODS:
        raise UsageError(f"--method: unknown method '{method}'; choose from {', '.join(METHODS)}.{did_you_mean(method, METHODS)}")
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    plan_targets: list[str] = []

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = list(lora_targets) if lora_targets else default_lora_targets(model.backbone)
        _check_targets(model.backbone, targets)
        config = LoraConfig(r=int(lora_r), lora_alpha=int(lora_alpha), lora_dropout=float(lora_dropout),
                            target_modules=targets, bias="none")
        model.backbone = get_peft_model(model.backbone, config)
        _expose_conv_attributes(model.backbone)
        plan_targets = targets
        body = {f"backbone.{n}" for n, p in model.backbone.named_parameters() if "lora_" in n}
    elif method == "ia3":
        from peft import IA3Config, get_peft_model

        targets, feedforward = ia3_targets(model.backbone)
        model.backbone = get_peft_model(model.backbone, IA3Config(target_modules=targets,
                                                                  feedforward_modules=feedforward))
        _expose_conv_attributes(model.backbone)
        plan_targets = targets
        body = {f"backbone.{n}" for n, p in model.backbone.named_parameters() if "ia3_" in n}
    elif method in PROMPT_METHODS:
        from .prompts import wrap

        body = wrap(model, method, int(virtual_tokens))
    elif method == "head":
        body = set()
    elif method in ("full", "gradual"):
        body = {f"backbone.{n}" for n, _ in model.backbone.named_parameters()}
    elif method == "bitfit":
        body = {f"backbone.{n}" for n, _ in model.backbone.named_parameters() if n.endswith("bias")}
    else:  # partial
        above, groups = layer_groups(model.backbone)
        n = int(train_layers)
        if not 1 <= n <= len(groups):
            raise UsageError(f"--train-layers: this model has {len(groups)} layers; choose 1 to {len(groups)}, got {n}.")
        body = {f"backbone.{p}" for p in above + [p for g in groups[-n:] for p in g]}

    trainable = head | body
    stages: list[set[str]] = []
    if method == "gradual":
        above, groups = layer_groups(model.backbone)
        # stage 0: head (+ pooler/final norm); stage k: + the top k layers; last: everything
        current = head | {f"backbone.{p}" for p in above}
        stages.append(set(current))
        for g in reversed(groups):
            current |= {f"backbone.{p}" for p in g}
            stages.append(set(current))
        stages.append(set(trainable))
    plan = Plan(method, trainable, stages, int(unfreeze_every), plan_targets)
    set_trainable(model, plan.trainable_at(0))
    return plan


def check(method: str, spec, virtual_tokens: int = VIRTUAL_TOKENS) -> None:
    """What can be refused from the model's spec alone, before anything loads or is written
    (prompt and prefix tuning: text models only; room for the virtual tokens)."""
    if method in PROMPT_METHODS:
        from .prompts import check_spec

        check_spec(method, spec, int(virtual_tokens))


def _expose_conv_attributes(module: nn.Module) -> None:
    """Some models read conv.stride or conv.kernel_size in forward (MobileNetV2's TF padding);
    peft's LoRA Conv2d wrapper keeps them only on its base layer, so mirror them."""
    for m in module.modules():
        base = getattr(m, "base_layer", None)
        if isinstance(base, nn.Conv2d) and not isinstance(m, nn.Conv2d):
            for attr in ("stride", "kernel_size", "dilation", "padding", "groups", "in_channels", "out_channels"):
                if not hasattr(m, attr):
                    setattr(m, attr, getattr(base, attr))


def set_trainable(model: nn.Module, names: set[str]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)


def freeze_frozen_norms(model: nn.Module) -> None:
    """Batch-norm layers whose weights do not train keep their running statistics too.

    Call after model.train(): a frozen BatchNorm left in train mode would still drift its
    running mean and variance, which silently changes the "frozen" backbone.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                m.eval()


def count_parameters(model: nn.Module, trainable: set[str]) -> dict:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    return {"trainable": train, "total": total, "ratio": round(train / total, 6) if total else 0.0}


def state_keys(model: nn.Module, plan: Plan) -> list[str]:
    """What a checkpoint must hold: trainable parameters and the buffers they own (BN stats)."""
    keys = set(plan.trainable)
    for mname, m in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in m.named_parameters(recurse=False)]
        if own and any(k in plan.trainable for k in own):
            keys |= {f"{mname}.{n}" if mname else n for n, _ in m.named_buffers(recurse=False)}
    return sorted(keys)
