"""What a run leaves for people: curves.png, confusion.png and a short model card."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], path: Path) -> None:
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.grid(alpha=0.3)
    b.plot(epochs, [h["accuracy"] for h in history], "o-", label="accuracy")
    b.plot(epochs, [h["macro_f1"] for h in history], "o-", label="macro-F1")
    b.set_xlabel("epoch"), b.set_ylim(0, 1.02), b.legend(), b.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, plt, path)


def plot_confusion(cm: list[list[int]], labels: list[str], path: Path) -> None:
    plt = _plt()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * n, 1 + 0.5 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    top = max(max(r) for r in cm) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, cm[i][j], ha="center", va="center", color="white" if cm[i][j] > top / 2 else "black")
    fig.tight_layout()
    _save(fig, plt, path)


def _save(fig, plt, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _rates(lrs: dict) -> str:
    if "backbone" not in lrs:
        return f"head lr {lrs['head']:g} (backbone frozen)"
    return f"lr {lrs['backbone']:g} (head {lrs['head']:g})"


def model_card(cfg, spec, result, plan) -> str:
    summary = result.to_json()  # an edgeft.results.TrainResult
    best = summary["best"]
    p = summary["parameters"]
    data = summary["data"]
    rows = "\n".join(
        f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
        for name, c in best["per_class"].items()
    )
    method = cfg.method
    if method == "lora":
        method += f" (r={cfg.lora_r}, alpha={cfg.lora_alpha}, targets: {', '.join(plan.lora_targets[:6])}" \
                  f"{' ...' if len(plan.lora_targets) > 6 else ''})"
    elif method == "ia3":
        method += f" ((IA)3 scaling vectors on: {', '.join(plan.lora_targets[:6])}" \
                  f"{' ...' if len(plan.lora_targets) > 6 else ''})"
    elif method == "partial":
        method += f" (top {cfg.train_layers} layers)"
    return f"""# Model card: {Path(cfg.output).name}

A {len(summary['labels'])}-class {spec.modality} classifier fine-tuned with edgeft {summary['edgeft_version']}.

- **Base model:** {spec.source} ({spec.family}, {spec.model_type}); features: {spec.pooling} pooling{f" ({spec.pooling_reason})" if spec.pooling_reason else ""}, {spec.feature_dim} dimensions
- **Method:** {method}; {p['trainable']:,} of {p['total']:,} parameters trained ({100 * p['ratio']:.2f}%)
- **Training data:** {data['train']['source']}, {data['train']['rows']} rows (fingerprint {data['train']['fingerprint']})
- **Validation data:** {data['val']['source']}, {data['val']['rows']} rows (fingerprint {data['val']['fingerprint']})
- **Labels:** {', '.join(summary['labels'])}
- **Schedule:** {len(summary['epochs'])} of {cfg.epochs} epochs{' (stopped early)' if summary['stopped_early'] else ''}, batch {cfg.batch_size}, {_rates(summary['trained']['learning_rates'])}, warmup {cfg.warmup:.0%} then linear decay, seed {cfg.seed}

## Result on the validation data (best epoch: {best['epoch']}, chosen by {best['metric']})

accuracy **{best['accuracy']:.4f}**, macro-F1 **{best['macro_f1']:.4f}**, loss {best['loss']:.4f}

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

Curves: `curves.png`; confusion matrix: `confusion.png`; every number: `metrics.json`.
These figures come from validation data only; judge the model on data it never saw.
"""
