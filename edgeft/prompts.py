"""Prompt and prefix tuning (peft prompt learning) for text models, and their export.

prompt   learned virtual-token embeddings, prepended to the input's token embeddings
         (peft PromptTuningConfig; Lester et al. 2021)
prefix   learned keys and values, prepended in every attention layer (peft PrefixTuningConfig;
         Li & Liang 2021)

Neither folds into the weights. A run trains them through peft (PeftModelForFeatureExtraction
around the text model); `merge_and_unload()` turns that into PromptedTextBackbone, which does
what peft's forward does with the learned table as a constant: the graph `edgeft export` writes
takes the same inputs as any text backbone (input_ids, attention_mask, token_type_ids),
prepends the table and extends the attention mask inside. Merge checks that it computes what
peft computed; a merged directory keeps the table in PROMPT_FILE beside the model's weights.

The features are pooled over the input's own tokens (the virtual tokens' states are dropped),
so `--pooling` means what it means for the other methods.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ModelError, UsageError
from .models import ModelSpec, PromptedTextBackbone, TextBackbone, pool

TABLE = {"prompt": "virtual tokens", "prefix": "key/value prefixes"}
WHAT = {"prompt": "learned virtual tokens (prompt tuning)", "prefix": "learned key/value prefixes (prefix tuning)"}


def check_spec(method: str, spec: ModelSpec, tokens: int) -> None:
    """Before anything loads: refuse image models (peft's prompt learning is for text), and leave
    room for the virtual tokens within the model's positions (shortens max_length if needed)."""
    if spec.modality != "text":
        raise UsageError(f"--method {method}: {spec.model_type} is an image model ({spec.family}); peft's "
                         f"{WHAT[method]} works on text models only. Use lora, ia3, bitfit or partial.")
    from transformers import AutoConfig

    limit = None
    try:
        limit = getattr(AutoConfig.from_pretrained(spec.path, local_files_only=True), "max_position_embeddings", None)
    except Exception:  # an unreadable config is reported when the model loads
        return
    if limit and spec.preprocessing["max_length"] + tokens > limit:
        if limit - tokens < 8:
            raise UsageError(f"--method {method}: {tokens} virtual tokens leave no room for the text in this "
                             f"model's {limit} positions.")
        spec.preprocessing["max_length"] = int(limit - tokens)


def wrap(model, method: str, tokens: int) -> set[str]:
    """Wrap a TaskModel's text backbone in peft prompt learning, in place; return what trains.

    A model family that peft or transformers refuse, or that silently ignores the learned tokens,
    ends in one line (UsageError) before training."""
    backbone = model.backbone
    if not isinstance(backbone, TextBackbone):
        raise UsageError(f"--method {method}: peft's {WHAT[method]} works on text models only; this is an image "
                         f"model ({type(backbone).__name__}). Use lora, ia3, bitfit or partial.")
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    c = backbone.model.config
    kind = getattr(c, "model_type", type(backbone.model).__name__)
    # the sizes from the model's config (its attribute map knows DistilBERT's dim, n_heads, ...)
    sizes = {k: getattr(c, a) for k, a in (("token_dim", "hidden_size"), ("num_layers", "num_hidden_layers"),
                                          ("num_attention_heads", "num_attention_heads")) if hasattr(c, a)}
    if method == "prompt":  # start from the embeddings of random words of the vocabulary, not N(0, 1)
        config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=tokens,
                                    prompt_tuning_init="SAMPLE_VOCAB", **sizes)
    else:
        config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=tokens, prefix_projection=False,
                                    **sizes)
    try:
        wrapped = PromptBackbone(get_peft_model(backbone.model, config), backbone.pooling, method, tokens)
        _probe(wrapped)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"--method {method}: {kind} text models (hf-text) do not take {WHAT[method]} here "
                         f"(peft/transformers: {first[:200]}). Use lora, ia3 or bitfit.") from None
    model.backbone = wrapped
    return {f"backbone.{n}" for n, _ in wrapped.named_parameters() if "prompt_encoder" in n}


def _probe(backbone: PromptBackbone) -> None:
    """One tiny forward and backward: the model must run with the learned tokens and its features
    must depend on them (a model that accepted and ignored them would train nothing)."""
    was = backbone.training
    backbone.eval()
    vocab = int(getattr(backbone.model.config, "vocab_size", 2) or 2)
    ids = torch.arange(3).remainder(vocab).unsqueeze(0)
    params = [p for n, p in backbone.named_parameters() if "prompt_encoder" in n]
    grad = 0.0
    try:
        out = backbone(ids, torch.ones_like(ids), torch.zeros_like(ids)).float().square().sum()
        if out.requires_grad:
            out.backward()
            grad = sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
    finally:
        for p in backbone.parameters():
            p.grad = None
        backbone.train(was)
    if not grad > 0:
        raise ModelError(f"its forward accepts the {TABLE[backbone.kind]} and ignores them: the features do not depend "
                         "on them, so nothing would train")


class PromptBackbone(nn.Module):
    """A text backbone whose model is a peft prompt-learning model (training, unmerged runs)."""

    def __init__(self, model, pooling: str, kind: str, tokens: int):
        super().__init__()
        self.model, self.pooling, self.kind, self.tokens = model, pooling, kind, int(tokens)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        # peft drops token_type_ids in prompt learning (a single text's are all zero anyway)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state[:, self.tokens:] if self.kind == "prompt" else out.last_hidden_state
        base = self.model.get_base_model()
        return pool(h, attention_mask, self.pooling, lambda: base.pooler(h))

    def save_pretrained(self, directory: str) -> None:  # the run's adapter/ folder, peft's format
        self.model.save_pretrained(directory)

    @torch.no_grad()
    def merge_and_unload(self) -> PromptedTextBackbone:
        table = self.model.get_prompt_embedding_to_save("default").detach().float().clone()
        return PromptedTextBackbone(self.model.get_base_model(), self.pooling, self.kind, table)
