"""The command line. Each command parses options, calls one library function, prints the result.

Heavy libraries (torch, transformers) are imported inside commands so `edgeft --help` is fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from . import __version__
from .errors import EdgeftError


class Group(click.Group):
    """Turns EdgeftError into one line and an exit code (2 input, 1 failed check); --debug keeps tracebacks."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("edgeft")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgeft")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.pass_context
def main(ctx, debug, verbose, quiet):
    """edgeft: fine-tune small models, ship them to edge devices, keep them learning there.

    \b
    Start with:  edgeft demo
    Then:        edgeft train --model minilm --data train.csv --method lora --output run/
    """
    ctx.obj = {"debug": debug}
    # edgeft never downloads: models come from local folders or packages installed offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _setup_logging(verbose, quiet)


@main.command(context_settings={"show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML file with the same options ([train] table); flags override it.")
@click.option("--model", help="Local Hugging Face directory, or an alias: minilm, efficientnet-lite0.")
@click.option("--data", help="Training data: CSV/JSONL with text,label columns, or an image folder (one sub-folder per class).")
@click.option("--val", help="Validation data; without it a stratified, seeded part of --data is held out.")
@click.option("--output", "-o", help="Run directory to create.")
@click.option("--method", type=click.Choice(["head", "lora", "full", "bitfit", "partial", "gradual"]), help="What trains.  [default: head]")
@click.option("--text-column", help="Column with the text (or image path).  [default: text]")
@click.option("--label-column", help="Column with the label.  [default: label]")
@click.option("--val-fraction", type=float, help="Held out when there is no --val.  [default: 0.2]")
@click.option("--epochs", type=int, help="Maximum epochs.  [default: per method: head 30, lora 5, full 4]")
@click.option("--batch-size", type=int, help="Batch size.  [default: head 32, others 16]")
@click.option("--lr", type=float, help="Learning rate of the backbone's trainable weights.  [default: per method]")
@click.option("--head-lr", type=float, help="Learning rate of the classifier head.  [default: per method]")
@click.option("--weight-decay", type=float, help="AdamW weight decay.  [default: 0.01]")
@click.option("--warmup", type=float, help="Fraction of steps warming up before linear decay.  [default: 0.1]")
@click.option("--seed", type=int, help="Seed for splits, shuffling and initialisation.  [default: 42]")
@click.option("--max-length", type=int, help="Text: longest token sequence.  [default: 128]")
@click.option("--pooling", type=click.Choice(["mean", "cls", "pooler", "max"]), help="Feature pooling.  [default: the model's own]")
@click.option("--image-size", type=int, help="Image: input size in pixels.  [default: the model's own]")
@click.option("--augment/--no-augment", default=None, help="Image: random crop, flip and colour jitter on training data.")
@click.option("--lora-r", type=int, help="LoRA rank.  [default: 8]")
@click.option("--lora-alpha", type=int, help="LoRA alpha.  [default: 16]")
@click.option("--lora-dropout", type=float, help="LoRA dropout.  [default: 0.1]")
@click.option("--lora-targets", help="Comma-separated layer names for LoRA.  [default: per architecture]")
@click.option("--train-layers", type=int, help="partial: how many top layers train.  [default: 2]")
@click.option("--unfreeze-every", type=int, help="gradual: epochs between unfreezing the next layer.  [default: 1]")
@click.option("--metric", type=click.Choice(["accuracy", "macro_f1", "loss"]), help="Chooses the best epoch and drives early stopping.  [default: accuracy]")
@click.option("--patience", type=int, help="Epochs without improvement before stopping.  [default: head 5, others 3]")
@click.option("--keep-checkpoints", type=int, help="How many recent epoch checkpoints to keep (the best is kept apart).  [default: 2]")
@click.option("--resume", is_flag=True, default=None, help="Continue an interrupted run from its last checkpoint.")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress bar.")
def train(config_path, **options):
    """Fine-tune a model on labelled data and write a run directory.

    \b
    Example:
      edgeft train --model minilm --data examples/maintenance/train.csv \\
                   --method lora --output runs/maint-lora

    The run directory holds trained.safetensors (the trained weights), labels.json,
    metrics.json, curves.png, confusion.png and a model card (README.md).
    """
    from .config import load_train_config
    from .train import train as run_train

    cfg = load_train_config(config_path, options)
    summary = run_train(cfg)
    best = summary["best"]
    t = summary["timing"]["total_seconds"]
    click.echo(
        f"train  ok  {t:.1f} s  {cfg.method}  best epoch {best['epoch']}  "
        f"accuracy {best['accuracy']:.4f}  macro-F1 {best['macro_f1']:.4f}  -> {cfg.output}"
    )


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Labelled data to evaluate on (same format as training).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def evaluate(run, data, text_column, label_column, as_json):
    """Evaluate a training run on held-out labelled data (PyTorch).

    \b
    Example:
      edgeft evaluate runs/maint-lora --data examples/maintenance/test.csv
    """
    from .runs import evaluate as run_evaluate

    report = run_evaluate(run, data, text_column, label_column)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(_report_table(report))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, help="Model directory to write.")
@click.option("--data", help="Labelled rows to check merged against unmerged on.  [default: the run's validation data]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
def merge(run, output, data, overwrite):
    """Fold LoRA adapters into the base weights; write a self-contained model directory.

    \b
    Example:
      edgeft merge runs/maint-lora --output models/maint

    Checks merged against unmerged logits on validation rows (over 1e-4 is an error). For
    head-only and other non-adapter runs it writes the same layout.
    """
    from .merge import merge as run_merge

    r = run_merge(run, output, data, overwrite)
    click.echo(f"merge  ok  {r['seconds']:.1f} s  max|Δ| {r['max_abs_diff']:.1e} on {r['rows']} rows  -> {output}")


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, help="Folder for backbone.onnx, head.onnx, model.onnx.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--data", help="Labelled rows for the parity check.  [default: the run's validation data]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
def export(source, output, opset, data, overwrite):
    """Export a model directory (or a run) to ONNX and check it against PyTorch.

    \b
    Example:
      edgeft export models/maint --output export/maint

    Writes backbone.onnx (inputs -> features), head.onnx (features -> logits, probs) and
    model.onnx (both), each self-contained with dynamic batch and sequence axes, plus
    export.json with labels, preprocessing, hashes and the parity figures.
    """
    from .export import export as run_export

    info = run_export(source, output, opset, data, overwrite)
    size = info["files"]["model.onnx"]["bytes"] / 1e6
    p = info["parity"]
    parity = f"max|Δ| {p['max_abs_diff']:.1e}  agreement {p['agreement']:.2%}" if p else "parity not checked"
    click.echo(f"export  ok  {info['seconds']:.1f} s  model.onnx {size:.1f} MB  {parity}  -> {output}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False), help="The PyTorch reference: a run or a merged model directory.")
@click.option("--data", required=True, help="Labelled rows both run on.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--max-abs-diff", type=float, help="Largest allowed |Δ logits|.  [default: 1e-4 for fp32, unchecked for int8/fp16]")
@click.option("--min-agreement", type=float, help="Smallest share of rows with the reference's top-1 label.  [default: 1.0 fp32, 0.99 quantized]")
@click.option("--max-drop", "max_accuracy_drop", type=float, help="Largest accuracy drop (0.01 = 1 point).  [default: unchecked fp32, 0.01 quantized]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write a JUnit XML report (one test case per check).")
def verify(artifact, reference, data, text_column, label_column, max_abs_diff, min_agreement,
           max_accuracy_drop, json_path, junit_path):
    """Check an exported model against its PyTorch reference; exit 1 when a check fails.

    \b
    Example (a CI gate):
      edgeft verify export/maint --reference models/maint \\
             --data examples/maintenance/test.csv --junit report.xml
    """
    from .runtime import atomic
    from .verify import table, write_junit
    from .verify import verify as run_verify

    report = run_verify(artifact, reference, data, text_column=text_column, label_column=label_column,
                        max_abs_diff=max_abs_diff, min_agreement=min_agreement,
                        max_accuracy_drop=max_accuracy_drop)
    if json_path:
        atomic.write_json(json_path, report)
    if junit_path:
        write_junit(report, junit_path)
    click.echo(table(report))
    if not report["passed"]:
        failed = "; ".join(c["message"] for c in report["checks"] if not c["passed"])
        click.echo(f"verify  FAILED  {failed}", err=True)
        sys.exit(1)
    click.echo(f"verify  ok  {report['rows']} rows  {report['seconds']:.1f} s")


def _report_table(report: dict) -> str:
    lines = [f"{'label':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'n':>5}"]
    for name, c in report["per_class"].items():
        lines.append(f"{name:<16} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f} {c['support']:>5}")
    lines.append(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  rows {report['rows']}")
    return "\n".join(lines)


@main.command()
@click.option("--output", "-o", default="edgeft-demo", show_default=True, help="Folder for everything the demo makes.")
@click.option("--method", type=click.Choice(["head", "lora"]), default="head", show_default=True)
def demo(output, method):
    """Run the built-in example end to end, offline, with the real all-MiniLM-L6-v2.

    Trains a maintenance-log router (6 teams) and evaluates it on held-out test data.
    """
    from .demo import run_demo

    result = run_demo(output, method)
    click.echo(_report_table(result["test"]))
    click.echo(f"demo  ok  {result['seconds']:.1f} s  test accuracy {result['test']['accuracy']:.4f}  -> {output}")
