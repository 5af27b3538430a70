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
from .config import BuildConfig, ExportConfig
from .errors import EdgeftError, UsageError
from .names import HEAD_FAMILIES, METHODS, METRICS, POOLINGS, VIRTUAL_TOKENS
from .runtime.retrain_config import RetrainConfig

_STDOUT = "\0stdout"  # verify --json without a FILE


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


def _late_option(name):
    """A global option given after the subcommand (`edgeft device check BUNDLE -v`) counts the same."""

    def callback(ctx, param, value):
        if not value:
            return
        obj = ctx.ensure_object(dict)
        if name == "verbose":
            obj["verbose"] = obj.get("verbose", 0) + value
        else:
            obj[name] = True
        if name != "debug":
            _setup_logging(obj.get("verbose", 0), obj.get("quiet", False))

    return callback


class Command(click.Command):
    """Every subcommand also takes the global options --debug, -v and -q."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["--debug"], is_flag=True, expose_value=False, callback=_late_option("debug"),
                         help="Show full tracebacks (also accepted before the command)."),
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_late_option("verbose"),
                         help="More log output on stderr."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_late_option("quiet"),
                         help="Only warnings and errors on stderr."),
        ]


Group.command_class = Command


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
    ctx.obj = {"debug": debug, "verbose": verbose, "quiet": quiet}
    # edgeft never downloads: models come from local folders or packages installed offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    _setup_logging(verbose, quiet)


# ---------------------------------------------------------------- options shared by commands


def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


data_columns = _options(
    click.option("--text-column", default="text", show_default=True, help="Column with the text (or image path)."),
    click.option("--label-column", default="label", show_default=True, help="Column with the label."),
)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing --output.")
public_key_option = click.option(
    "--public-key", type=click.Path(dir_okay=False),
    help="Refuse the bundle unless the owner's signature verifies with this key.")


def output_option(help: str, **kw):
    return click.option("--output", "-o", required=True, help=help, **kw)


def threshold_options(reference: str, agreement_default: str, drop_default: str):
    """--min-agreement and --max-drop, against `reference` (PyTorch, or the fp32 export)."""
    return _options(
        click.option("--min-agreement", type=float,
                     help=f"Smallest share of rows keeping {reference}'s top-1 label.  [default: {agreement_default}]"),
        click.option("--max-drop", "max_drop", type=float,
                     help=f"Accuracy budget: largest accuracy drop vs {reference} (0.005 = 0.5 point).  "
                          f"[default: {drop_default}]"),
    )


def json_options(what: str):
    """The one convention for machine-readable output: --json prints it, --json-file FILE writes it."""
    return _options(
        click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout (and nothing else there)."),
        click.option("--json-file", type=click.Path(dir_okay=False), help=f"Write {what} as JSON to this file."),
    )


def emit_json(data, as_json: bool, json_file: str | None) -> bool:
    """Write `data` to --json-file and print it for --json; True when stdout got the JSON."""
    if json_file:
        from .runtime import atomic

        atomic.write_json(json_file, data)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    return as_json


# ---------------------------------------------------------------- commands


@main.command(context_settings={"show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML file with the same options ([train] table); flags override it.")
@click.option("--model", help="Local Hugging Face directory, or an alias: minilm, efficientnet-lite0.")
@click.option("--data", help="Training data: CSV/JSONL with text,label columns, or an image folder (one sub-folder per class).")
@click.option("--val", help="Validation data; without it a stratified, seeded part of --data is held out.")
@click.option("--output", "-o", help="Run directory to create.")
@click.option("--method", type=click.Choice(METHODS), help="What trains.  [default: head]")
@click.option("--head", type=click.Choice(HEAD_FAMILIES), help="Head family its bundles answer with; ridge is also fitted here from a head-only run's cached features in one solve.  [default: softmax]")
@click.option("--text-column", help="Column with the text (or image path).  [default: text]")
@click.option("--label-column", help="Column with the label.  [default: label]")
@click.option("--val-fraction", type=float, help="Held out when there is no --val.  [default: 0.2]")
@click.option("--epochs", type=int, help="Maximum epochs.  [default: per method: head 100, lora 5, full 4]")
@click.option("--batch-size", type=int, help="Batch size.  [default: head 32, others 16]")
@click.option("--lr", type=float, help="Learning rate of the backbone's trainable weights.  [default: per method]")
@click.option("--head-lr", type=float, help="Learning rate of the classifier head.  [default: per method]")
@click.option("--weight-decay", type=float, help="AdamW weight decay.  [default: 0.01]")
@click.option("--warmup", type=float, help="Fraction of steps warming up before linear decay.  [default: 0.1]")
@click.option("--seed", type=int, help="Seed for splits, shuffling and initialisation.  [default: 42]")
@click.option("--max-length", type=int, help="Text: longest token sequence.  [default: 128]")
@click.option("--pooling", type=click.Choice(POOLINGS), help="Feature pooling.  [default: the model's own]")
@click.option("--image-size", type=int, help="Image: input size in pixels.  [default: the model's own]")
@click.option("--dropout", type=float, help="Dropout before the classifier head.  [default: 0.1]")
@click.option("--backbone-dropout", type=float, help="Dropout inside the backbone.  [default: the model's own]")
@click.option("--augment/--no-augment", default=None, help="Image: random crop, flip and colour jitter on training data.")
@click.option("--lora-r", type=int, help="LoRA rank.  [default: 8]")
@click.option("--lora-alpha", type=int, help="LoRA alpha.  [default: 16]")
@click.option("--lora-dropout", type=float, help="LoRA dropout.  [default: 0.1]")
@click.option("--lora-targets", help="Comma-separated layer names for LoRA.  [default: per architecture]")
@click.option("--train-layers", type=int, help="partial: how many top layers train.  [default: 2]")
@click.option("--unfreeze-every", type=int, help="gradual: epochs between unfreezing the next layer.  [default: 1]")
@click.option("--virtual-tokens", type=int, help=f"prompt, prefix: learned tokens (each costs one input position at inference).  [default: {VIRTUAL_TOKENS}]")
@click.option("--metric", type=click.Choice(METRICS), help="Chooses the best epoch and drives early stopping.  [default: accuracy]")
@click.option("--patience", type=int, help="Epochs without improvement before stopping.  [default: head 10, others 3]")
@click.option("--keep-checkpoints", type=int, help="How many recent epoch checkpoints to keep (the best is kept apart).  [default: 2]")
@click.option("--resume", is_flag=True, default=None, help="Continue an interrupted run from its last checkpoint.")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress bar.")
@click.option("--nproc", type=int, help="Local training processes, launched through torchrun (DDP; gloo on CPU).  [default: 1]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step; --batch-size stays the global batch.  [default: 1]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Mixed precision through accelerate (fp16 needs a GPU).  [default: fp32]")
@click.option("--folds", type=int, help="Stratified K-fold cross-validation of --data: K runs, each judged on its held-out fold; OUTPUT/cv.json gets each metric's mean and standard deviation.")
@click.option("--keep-folds", is_flag=True, default=None, help="With --folds: keep each fold's run directory (OUTPUT/fold-K/run).")
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
    from .launch import in_worker, launch

    cfg = load_train_config(config_path, options)
    if cfg.folds and cfg.nproc > 1:  # before any worker starts
        raise UsageError("--folds trains its folds one after another on one process; drop --nproc.")
    if cfg.nproc > 1 and not in_worker():
        sys.exit(launch(cfg.nproc, sys.argv[1:]))
    if cfg.folds:
        from .folds import cross_validate

        r = cross_validate(cfg)
        acc, f1 = r["metrics"]["accuracy"], r["metrics"]["macro_f1"]
        click.echo(f"train  ok  {r['seconds']:.1f} s  {cfg.method}  {r['folds']} folds of {r['rows']} rows  "
                   f"accuracy {acc['mean']:.4f} ± {acc['std']:.4f}  macro-F1 {f1['mean']:.4f} ± {f1['std']:.4f}  "
                   f"-> {os.path.join(cfg.output, 'cv.json')}")
        return
    from .train import train as run_train

    summary = run_train(cfg)
    if not summary:  # a worker other than the main one: the main one reports
        return
    best, t = summary.best, summary.seconds
    click.echo(
        f"train  ok  {t:.1f} s  {cfg.method}  best epoch {best['epoch']}  "
        f"accuracy {best['accuracy']:.4f}  macro-F1 {best['macro_f1']:.4f}  -> {cfg.output}"
    )


@main.command()
@click.option("--model", required=True, help="Local Hugging Face directory, or an alias: minilm, efficientnet-lite0.")
@click.option("--data", required=True, help="Training data (as for edgeft train).")
@click.option("--val", help="Validation data every trial is scored on; without it the same seeded split of --data.")
@output_option("Folder to create: tune.json, recipe.toml, best-run/.")
@click.option("--methods", default="head,lora", show_default=True, help="Comma-separated methods the search may choose from.")
@click.option("--trials", type=int, default=20, show_default=True, help="Trials at most.")
@click.option("--timeout", type=float, help="Seconds at most; the running trial finishes.")
@click.option("--metric", type=click.Choice(METRICS), default="accuracy", show_default=True, help="What each trial is scored by, on the validation rows at its best epoch.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the sampler, the split and every trial.")
@click.option("--pooling", type=click.Choice(POOLINGS), help="Feature pooling.  [default: the model's own]")
@data_columns
def tune(model, data, val, output, methods, trials, timeout, metric, seed, pooling, text_column, label_column):
    """Search methods, learning rates and epochs with optuna; write the best as a recipe.

    \b
    Example:
      edgeft tune --model minilm --data examples/maintenance/train.csv --trials 12 --output tune/maint
      edgeft run tune/maint/recipe.toml
    """
    from .config import TrainConfig
    from .tune import tune as run_tune

    cfg = TrainConfig(model=model, data=data, val=val, output=output, metric=metric, seed=seed, pooling=pooling,
                      text_column=text_column, label_column=label_column, progress=False)
    r = run_tune(cfg, [m.strip() for m in methods.split(",") if m.strip()], trials=trials, timeout=timeout)
    b = r["best"]
    settings = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in b.items()
                         if k not in ("trial", "score", "method") and v is not None)
    click.echo(f"tune  ok  {r['seconds']:.1f} s  {r['completed']} of {len(r['trials'])} trials  best: trial {b['trial']} "
               f"{b['method']}  {settings}  {metric} {b['score']:.4f} (validation)  -> {output}/recipe.toml")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Labelled data to evaluate on (same format as training).")
@data_columns
@json_options("the full report")
def evaluate(run, data, text_column, label_column, as_json, json_file):
    """Evaluate a training run on held-out labelled data (PyTorch).

    \b
    Example:
      edgeft evaluate runs/maint-lora --data examples/maintenance/test.csv
    """
    from .runs import evaluate as run_evaluate

    report = run_evaluate(run, data, text_column, label_column)
    if not emit_json(report, as_json, json_file):
        click.echo(_report_table(report))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@output_option("Model directory to write.")
@click.option("--data", help="Labelled rows to check merged against unmerged on.  [default: the run's validation data]")
@overwrite_option
def merge(run, output, data, overwrite):
    """Fold LoRA or (IA)3 adapters into the base weights; write a self-contained model directory.

    \b
    Example:
      edgeft merge runs/maint-lora --output models/maint

    Checks merged against unmerged logits on validation rows (over 1e-4 is an error). For
    head-only and other non-adapter runs it writes the same layout.
    """
    from .merge import merge as run_merge

    r = run_merge(run, output, data, overwrite)
    click.echo(f"merge  ok  {r.seconds:.1f} s  max|Δ| {r.max_abs_diff:.1e} on {r.rows} rows  -> {output}")


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@output_option("Folder for backbone.onnx, head.onnx, model.onnx.")
@click.option("--opset", type=int, default=ExportConfig.opset, show_default=True, help="ONNX opset.")
@click.option("--data", help="Labelled rows for the parity check.  [default: the run's validation data]")
@overwrite_option
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
    size = info.files["model.onnx"]["bytes"] / 1e6
    p = info.parity
    parity = f"max|Δ| {p['max_abs_diff']:.1e}  agreement {p['agreement']:.2%}" if p else "parity not checked"
    click.echo(f"export  ok  {info.seconds:.1f} s  model.onnx {size:.1f} MB  {parity}  -> {output}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--reference", required=True, type=click.Path(exists=True, file_okay=False), help="The PyTorch reference: a run or a merged model directory.")
@click.option("--data", required=True, help="Labelled rows both run on.")
@data_columns
@click.option("--max-abs-diff", type=float, help="Largest allowed |Δ logits|.  [default: 1e-4 for fp32, unchecked for int8/fp16]")
@threshold_options("the reference", "1.0 fp32, 0.99 quantized", "unchecked fp32, 0.005 quantized")
# --json FILE was the old spelling of --json-file FILE: still read, with a notice (CI files in the wild)
@click.option("--json", "as_json", is_flag=False, flag_value=_STDOUT, default=None, metavar="",
              help="Print the full report as JSON on stdout (and nothing else there).")
@click.option("--json-file", type=click.Path(dir_okay=False), help="Write the full report as JSON to this file.")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write a JUnit XML report (one test case per check).")
@public_key_option
@click.option("--parity-data", help="More inputs (labels optional: .txt one per line, CSV/JSONL, image folder) that judge agreement.")
@click.option("--certify", is_flag=True, help="Judge agreement on its one-sided 95% lower bound: too few rows fail, and the message says how many would pass.")
def verify(artifact, reference, data, text_column, label_column, max_abs_diff, min_agreement,
           max_drop, as_json, json_file, junit_path, public_key, parity_data, certify):
    """Check an exported model against its PyTorch reference; exit 1 when a check fails.

    \b
    Example (a CI gate):
      edgeft verify export/maint --reference models/maint \\
             --data examples/maintenance/test.csv --junit report.xml
    """
    from .verify import table, write_junit
    from .verify import verify as run_verify

    if as_json not in (None, _STDOUT):
        click.echo(f"notice: --json {as_json} is the old spelling; write the file with --json-file {as_json} "
                   "(--json alone prints the report).", err=True)
        json_file, as_json = json_file or as_json, None
    report = run_verify(artifact, reference, data, text_column=text_column, label_column=label_column,
                        max_abs_diff=max_abs_diff, min_agreement=min_agreement,
                        max_accuracy_drop=max_drop, public_key=public_key, parity_data=parity_data,
                        certify=certify)
    if junit_path:
        write_junit(report, junit_path)
    if not emit_json(report.to_json(), as_json is not None, json_file):
        click.echo(table(report))
    if not report.passed:
        failed = "; ".join(c["message"] for c in report.checks if not c["passed"])
        click.echo(f"verify  FAILED  {failed}", err=True)
        sys.exit(1)
    click.echo(f"verify  ok  {report.rows} rows  {report.seconds:.1f} s", err=as_json is not None)


@main.command("compare")
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--data", required=True, help="Labelled rows both answer (CSV/JSONL or an image folder).")
@data_columns
@click.option("--require", type=click.Choice(["none", "better", "not-worse"]), default="none", show_default=True,
              help="Exit 1 unless B is significantly more accurate (better), or B's accuracy is at most --margin below A's at the interval's lower end (not-worse).")
@click.option("--margin", type=float, default=0.0, show_default=True, help="For --require not-worse: how far below A B may be, in accuracy units (0.005 = half a point).")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Of the interval; the test's level is 1 - confidence.")
@json_options("the full report")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write a JUnit XML report (the requirement as one test case).")
@public_key_option
def compare_cmd(a, b, data, text_column, label_column, require, margin, confidence, as_json, json_file, junit_path,
                public_key):
    """A/B: model B against model A on the same labelled rows (McNemar's exact test, a paired interval).

    A and B are runs, model directories, export folders or bundles. Exit 1 when --require fails.

    \b
    Example (refuse a candidate that is not better than the model in the field):
      edgeft compare bundles/field bundles/candidate --data holdout.csv --require better
    """
    from .ab import compare, requirement_message, table, write_junit

    report = compare(a, b, data, text_column=text_column, label_column=label_column, confidence=confidence,
                     require=require, margin=margin, public_key=public_key)
    if junit_path:
        write_junit(report, junit_path)
    if not emit_json(report, as_json, json_file):
        click.echo(table(report))
    if not report["passed"]:
        click.echo(f"compare  FAILED  {requirement_message(report)}", err=True)
        sys.exit(1)


@main.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.option("--device", required=True, help="A profile name from devices/ (see edgeft devices) or a path to your own .toml.")
@output_option("Bundle folder to write.")
@click.option("--calibration", help="Real samples that calibrate int8 (static, NNCF) and rank nodes for the search.  [default: the training rows]")
@click.option("--data", help="Labelled rows for the parity check.  [default: the run's validation data]")
@click.option("--replay", type=int, default=BuildConfig.replay, show_default=True, help="Training features kept per class for on-device retraining (0: none).")
@click.option("--head", "head_family", type=click.Choice(HEAD_FAMILIES),
              help="The head the device answers with and retrains: softmax (the trained head), or ridge (random ReLU "
                   "features + class-balanced ridge, solved from statistics; the trained head stays one version back).  "
                   "[default: the run's --head, else softmax]")
@threshold_options("PyTorch", "1.0 fp32, 0.99 quantized", "0.005 quantized")
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False, exists=True), help="Sign the bundle with this private key (see edgeft keys generate).")
@click.option("--archive", is_flag=True, help="Also write BUNDLE.tar.gz.")
@overwrite_option
@click.option("--keep-examples", is_flag=True, help="The owner's rows may ship: parity.json keeps their texts/image names, and device check's reference inputs are real rows (by default: rows named by hash, synthetic reference inputs).")
@click.option("--parity-data", help="More inputs that judge agreement, labels optional: .txt one per line, CSV/JSONL, image folder.")
@click.option("--uncertified", is_flag=True, help="Quantized: pass on the point estimate instead of its 95% lower bound (too few rows then pass; the bundle says it is not certified).")
@click.option("--emulate/--no-emulate", default=None, help="ARM64 profiles: run the device check under QEMU with aarch64 kernels.  [default: when tools/arm64-emulator.sh has set it up]")
def build(source, device, output, calibration, data, replay, head_family, min_agreement, max_drop, sign_key, archive,
          overwrite, keep_examples, parity_data, uncertified, emulate):
    """Build a verified bundle of a run or model directory for one device.

    \b
    Example:
      edgeft build runs/maint-lora --device raspberry-pi-5 --output bundles/pi5

    The device's plugin picks opset, precision, execution providers and extra files. The
    bundle holds manifest.json (sha256 of every file), backbone.onnx, heads/, the
    preprocessing, reference inputs with their PyTorch outputs and parity.json. It is
    written only if its parity with PyTorch holds; an interrupted build leaves nothing.
    """
    from .build import build as run_build

    built = run_build(BuildConfig(source, device, output, calibration=calibration, data=data, archive=archive,
                              overwrite=overwrite, min_agreement=min_agreement, max_drop=max_drop, replay=replay,
                              sign_key=sign_key, keep_examples=keep_examples, head=head_family,
                              parity_data=parity_data, uncertified=uncertified, emulate=emulate))
    m, size, p = built.manifest, built.bytes / 1e6, built.parity
    judged = " + ".join(f"{n} {s}" for s, n in (p.get("sources") or {}).items())
    click.echo(f"build  ok  {built.seconds:.1f} s  {m['device']['profile']} ({m['target']['name']}, {m['precision']})  "
               f"{size:.1f} MB  agreement {p['agreement']:.2%} on {p['rows']} rows" + (f" ({judged})" if judged else "")
               + (f", at least {p['bounds']['agreement_lower']:.2%} at 95%" if p.get("bounds") else "")
               + (" (uncertified)" if "not certified" in (p.get("judged_on") or "") else "")
               + f"  accuracy {p['accuracy']:.4f} (PyTorch {p['reference_accuracy']:.4f}) on "
               f"{(p.get('bounds') or {}).get('labelled_rows', p['rows'])} labelled rows  -> {output}")
    e = p.get("emulated")
    if e:
        click.echo(f"  arm64 check: {e['cpu']} emulated, {e['agreement']:.2%} of {e['rows']} reference rows answer as on "
                   "this host" + (f" ({e['disagreements']} near-tie row(s) differ: the reference rows include the "
                                  "smallest margins)" if e.get("disagreements") else "")
                   + "; the kernels' numbers, not the device's speed" if e["status"] == "ran"
                   else f"  arm64 check {e['status']}")
    q = m.get("quantization")
    if q:
        missed = [f"{t['mode']} (agreement {t['agreement']:.1%})" for t in q["tried"]
                  if not t.get("passed") and t.get("agreement") is not None]
        kept = f", {len(q['kept_float'])} node(s) kept in float" if q.get("kept_float") else ""
        kept += (", fused " + ", ".join(f"{n} {op}" for op, n in q["fusion"]["fused"].items())) if q.get("fusion") else ""
        click.echo(f"  {q['mode']}{kept}: {q['latency_ms']:.2f} ms per row (backbone, batch 1; fp32 "
                   f"{q['fp32_latency_ms']:.2f} ms)" + (f"; missed the budget: {', '.join(missed)}" if missed else ""))
        if q.get("chosen_by"):  # timed here, or the target's documented order when this host is another ISA class
            click.echo(f"  chosen by {q['chosen_by']['method']}: {q['chosen_by']['said']}")


@main.command()
@json_options("targets and profiles")
def devices(as_json, json_file):
    """List device targets from every installed plugin, and the device profiles.

    \b
    Example:
      edgeft devices
    """
    from .plugins import registry
    from .profiles import all_profiles, read_profile

    reg = registry()
    profiles = {name: read_profile(path) for name, path in all_profiles().items()}
    listing = {
        "targets": {t.name: {"plugin": t.plugin, "description": t.description, "precision": t.precision,
                             "precisions": list(t.precisions), "providers": list(t.providers),
                             "opset": t.opset, "static_shapes": t.static_shapes} for t in reg.targets.values()},
        "profiles": {n: {"target": p.target, "description": p.description, "precision": p.precision,
                         "path": p.path} for n, p in profiles.items()},
    }
    if emit_json(listing, as_json, json_file):
        return
    click.echo("targets")
    for t in sorted(reg.targets.values(), key=lambda t: t.name):
        click.echo(f"  {t.name:<10} {t.precision:<12} {t.description}  [plugin {t.plugin}]")
    click.echo("profiles")
    for n, p in profiles.items():
        click.echo(f"  {n:<20} {p.target:<8} {(p.precision or '-'):<12} {p.description}")


@main.group(cls=Group)
def device():
    """On the device: torch-free commands (onnxruntime + numpy) on an installed bundle."""


@device.command("predict")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1)
@click.option("--file", "file_", type=click.File("r", encoding="utf-8"), help="One input per line (- for standard input).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input per line: label, confidence, probs, and ood_score and unknown where the bundle has a replay memory.")
@click.option("--json-file", type=click.Path(dir_okay=False), help="Write the answers as a JSON list to this file.")
@click.option("--top", type=int, default=1, show_default=True, help="Labels to print per input.")
@click.option("--false-alarm", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.05, show_default=True,
              help="Share of in-distribution inputs the out-of-distribution flag may call unknown (its threshold is set on the replay's hold-out rows).")
@click.option("--collect", "collect_dir", type=click.Path(file_okay=False),
              help="Keep the inputs flagged unknown in DIR/unknown.csv (images copied to DIR/images/), with an empty label column to fill in for device retrain --data.")
@public_key_option
def device_predict(bundle, inputs, file_, as_json, json_file, top, false_alarm, collect_dir, public_key):
    """Predict labels for texts or image paths with the bundle's active head.

    \b
    Example:
      edgeft device predict bundles/pi5 "hydraulic hose weeping at press 4"
      ls images/*.png | edgeft device predict bundles/insp --file - --json
      edgeft device predict bundles/pi5 --file today.txt --collect to-label/
    """
    from .runtime.bundle import Bundle

    items = list(inputs)
    if file_ is not None:
        items += [line.rstrip("\n") for line in file_ if line.strip()]
    if not items:
        raise click.UsageError("give inputs as arguments or with --file.")
    b = Bundle(bundle, public_key=public_key)
    if collect_dir and b.ood(false_alarm) is None:
        raise UsageError(f"{bundle}: --collect keeps inputs flagged unknown, and this bundle carries no replay memory "
                         "to flag them with (build it with --replay N).")
    answers = [{"input": item, **r} for item, r in zip(items, b.predict(items, false_alarm=false_alarm), strict=True)]
    if json_file:
        from .runtime import atomic

        atomic.write_json(json_file, answers)
    if collect_dir:
        from .runtime.collect import FILE, collect

        added = collect(collect_dir, b.manifest["modality"], answers)
        flagged = sum(bool(a.get("unknown")) for a in answers)
        click.echo(f"collect  {flagged} of {len(answers)} inputs flagged unknown, {added} new in "
                   f"{os.path.join(collect_dir, FILE)}", err=True)
    for item, r in zip(items, answers, strict=True):
        if as_json:
            click.echo(json.dumps(r))
        else:
            best = sorted(r["probs"].items(), key=lambda kv: -kv[1])[:top]
            flag = [f"unknown (ood {r['ood_score']:.3f})"] if r.get("unknown") else []
            click.echo("\t".join([*(f"{n} {p:.3f}" for n, p in best), *flag, item]))


@device.command("check")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--providers", help="Comma-separated execution providers.  [default: the bundle's]")
@json_options("the report")
@public_key_option
@click.option("--emulate", is_flag=False, flag_value="profile", default=None, metavar="CPU",
              help="Run the check with ONNX Runtime's aarch64 kernels under QEMU: cortex-a72 (Pi 4), cortex-a76 (Pi 5); "
                   "alone: the bundle profile's cpu. Set up once with tools/arm64-emulator.sh.")
def device_check(bundle, providers, as_json, json_file, public_key, emulate):
    """Check the bundle on this device's runtime against the PyTorch outputs stored at build.

    \b
    Example (after installing a bundle on the device):
      edgeft device check bundles/pi5

    Verifies every file's sha256, runs the bundled reference inputs with the profile's
    execution providers, and exits 1 when parity fails.
    """
    from .runtime.bundle import Bundle

    b = Bundle(bundle, providers=providers.split(",") if providers else None, public_key=public_key)
    if emulate:
        from .emulate import check as emulated_check
        from .emulate import profile_cpu

        cpu = profile_cpu(b.manifest) if emulate == "profile" else emulate
        if cpu is None:
            raise click.UsageError(f"{bundle}: its profile names no ARM64 cpu to emulate; name one, e.g. --emulate cortex-a72.")
        report = emulated_check(bundle, cpu)
    else:
        report = b.check()
    if not emit_json(report, as_json, json_file):
        for c in report["checks"]:
            click.echo(f"{c['name']:<14} {'pass' if c['passed'] else 'FAIL'}  {c['message']}")
        click.echo(f"providers {', '.join(report['providers'])}  head v{report['head_version']}  "
                   f"precision {report['precision']}")
        built = (b.manifest.get("parity") or {}).get("bounds")
        if built:  # what the build's gate measured on all its rows, beside this check's few
            from .runtime.stats import describe

            click.echo(f"build  {describe(built)} (PyTorch against this bundle on the build host)")
        if report.get("emulated"):
            e = report["emulated"]
            click.echo(f"emulated {e['describes']} ({report.get('machine')}, onnxruntime {report.get('onnxruntime')}, "
                       f"{e['seconds']:.0f} s): {report['agreement']:.2%} of {report['rows']} rows agree with the "
                       f"x86 build; it proves the kernels' numbers, not the device's speed")
    if not report["passed"]:
        click.echo("device check  FAILED", err=True)
        sys.exit(1)
    click.echo("device check  ok", err=as_json)


@device.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--file", "file_", type=click.File("r", encoding="utf-8"), help="Real inputs, one per line (- for standard input).  [default: the bundle's reference inputs]")
@click.option("--runs", type=int, default=100, show_default=True, help="Timed batch-1 calls, cycling through the inputs.")
@click.option("--warmup", type=int, default=5, show_default=True, help="Untimed calls first.")
@click.option("--threads", type=int, help="Intra-op threads.  [default: the bundle's]")
@json_options("the report")
@public_key_option
def device_bench(bundle, file_, runs, warmup, threads, as_json, json_file, public_key):
    """Measure the bundle on this device: load time, p50/p99 batch-1 latency, peak RSS.

    \b
    Example:
      edgeft device bench bundles/pi5
      edgeft device bench bundles/pi5 --file field-notes.txt --runs 500

    The report is also written as JSON under BUNDLE/bench/, so a fleet can compare devices.
    """
    from .runtime.bench import bench, summary

    items = [line.rstrip("\n") for line in file_ if line.strip()] if file_ is not None else None
    r = bench(bundle, items=items, runs=runs, warmup=warmup, threads=threads, public_key=public_key)
    if not emit_json(r, as_json, json_file):
        click.echo(summary(r))


@device.command("retrain")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Labelled samples (same formats as training).")
@click.option("--add-classes", is_flag=True, help="Allow labels the model does not know yet: they become new classes.")
@click.option("--margin", type=float, default=RetrainConfig.margin, show_default=True, help="Largest accuracy drop on the replay hold-out of earlier classes (0.02 = 2 points).")
@click.option("--keep", type=int, default=RetrainConfig.keep, show_default=True, help="Head versions to keep; older ones are deleted.")
@click.option("--text-column", default=RetrainConfig.text_column, show_default=True, help="Column with the text (or image path).")
@click.option("--label-column", default=RetrainConfig.label_column, show_default=True, help="Column with the label.")
@json_options("the report")
@public_key_option
def device_retrain(bundle, data, add_classes, margin, keep, text_column, label_column, as_json, json_file,
                   public_key):
    """Retrain the head on this device from labelled samples (numpy + onnxruntime only).

    \b
    Example (teach a new class from a few dozen samples):
      edgeft device retrain bundles/pi5 --data pneumatic.csv --add-classes

    Trains on the new samples plus the bundle's replay memory of the original training
    data. The new head is kept only if accuracy on held-out new samples improves and
    accuracy on earlier classes drops by at most --margin; otherwise nothing changes and
    the exit code is 1. An accepted head becomes the next version; see history, rollback.
    """
    # the fit multiplies small matrices: BLAS threads only fight over the cores (0.2 s with one
    # thread against up to 6 s with two on a busy 2-core board)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from .runtime.retrain import retrain

    config = RetrainConfig(add_classes=add_classes, margin=margin, keep=keep, text_column=text_column,
                           label_column=label_column)
    r = retrain(bundle, data, config, public_key=public_key)
    if emit_json(r.to_json(), as_json, json_file):
        return
    new, old = r.metrics["new_holdout_accuracy"], _guard_old(r.metrics)
    added = f"  added {', '.join(r.added_classes)}" if r.added_classes else ""
    click.echo(f"retrain  ok  {r.seconds:.1f} s  head v{r.previous_version} -> v{r.version}{added}  "
               f"new samples {_pct(new['before'])} -> {_pct(new['after'])} ({new['rows']} rows)  "
               f"earlier classes {_pct(old['before'])} -> {_pct(old['after'])} ({old['rows']} rows)"
               + (f"  skipped {r.skipped_rows} rows already learned" if r.skipped_rows else ""))


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _guard_old(metrics) -> dict:
    """The figure the retrain guard judged the earlier classes by: a ridge retrain's
    old_classes_accuracy (the rows its statistics keep, out-of-fold, + the replay hold-out),
    else the replay hold-out's accuracy; {} when the version has neither."""
    if not isinstance(metrics, dict):
        return {}
    for key in ("old_classes_accuracy", "replay_holdout_accuracy"):
        if isinstance(metrics.get(key), dict):
            return metrics[key]
    return {}


@device.command("history")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@json_options("the versions")
def device_history(bundle, as_json, json_file):
    """List the bundle's head versions with their metrics.

    \b
    Example:
      edgeft device history bundles/pi5
    """
    from .runtime.manifest import read_manifest
    from .runtime.retrain import history

    rows = history(bundle)
    if emit_json(rows, as_json, json_file):
        return
    # the old classes as the guard judged them, and on how many rows (read beside history's rows)
    judged = {h.get("version"): _guard_old(h.get("metrics")) for h in read_manifest(bundle)["heads"]}
    click.echo(f"{'':2}{'version':<8} {'created':<21} {'source':<16} {'classes':>7} {'new acc':>8} {'old acc':>8} "
               f"{'old rows':>8}  added")
    for h in rows:
        mark = "*" if h["active"] else ("x" if h["pruned"] else " ")
        old = h.get("old_classes_accuracy")
        old = h["replay_accuracy"] if old is None else old
        n = judged.get(h["version"], {}).get("rows")
        n = str(n) if isinstance(n, int) and not isinstance(n, bool) else "-"
        click.echo(f"{mark:<2}v{h['version']:<7} {h['created'] or '-':<21} {h['source'] or '-':<16} {h['classes']:>7} "
                   f"{_pct(h['new_accuracy']):>8} {_pct(old):>8} {n:>8}  {', '.join(h['added_classes'])}")


@device.command("rollback")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "version", type=int, help="Head version to make active.  [default: the one before the active one]")
@public_key_option
def device_rollback(bundle, version, public_key):
    """Make an earlier head version active again.

    \b
    Example:
      edgeft device rollback bundles/pi5 --to 1
    """
    from .runtime.retrain import rollback

    r = rollback(bundle, version, public_key)
    click.echo(f"rollback  ok  head v{r.from_version} -> v{r.to_version}  ({len(r.labels)} classes)")


@main.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--mode", required=True, type=click.Choice(["dynamic", "dynamic-fused", "dynamic-smooth", "dynamic-smooth-fused", "static", "nncf", "fp16", "weight-only", "weight-only-fused"]), help="dynamic: int8 weights and activations; dynamic-fused: ONNX Runtime's transformer fusions, then dynamic int8; dynamic-smooth(-fused): SmoothQuant-style smoothing of activation outliers into the weights (calibrated), then dynamic int8 (of the fused graph); static: int8 QDQ calibrated on real samples; nncf: int8 QDQ by NNCF's recipe for the model type (needs the openvino extra); fp16: half precision; weight-only: int8 weights, float activations; weight-only-fused: the same on ONNX Runtime's fused graph.")
@click.option("--calibration", help="Real rows (labels optional) that calibrate static/nncf and rank nodes for the search.  [default: the export's validation rows]")
@click.option("--per-channel/--no-per-channel", default=True, show_default=True, help="int8: one scale per output channel (keeps more answers than one per tensor).")
@output_option("Folder to write, laid out like the export.")
@data_columns
@threshold_options("the fp32 export", "0.99", "0.005")
@click.option("--search/--no-search", default=True, show_default=True, help="When int8 misses the budget, keep the nodes it hurts most in float (dynamic, static) or run NNCF's accuracy control (nncf) until it holds.")
@overwrite_option
@click.option("--parity-data", help="More inputs that judge agreement, labels optional: .txt one per line, CSV/JSONL, image folder.")
@click.option("--uncertified", is_flag=True, help="Pass on the point estimate instead of its 95% lower bound (too few rows then pass; quantize.json says it is not certified).")
def quantize(export_dir, mode, calibration, per_channel, output, text_column, label_column, min_agreement,
             max_drop, search, overwrite, parity_data, uncertified):
    """Quantize an export's backbone (int8 or fp16) and check it against the fp32 export.

    \b
    Example:
      edgeft quantize export/maint --mode dynamic --output export/maint-int8

    The head stays fp32 (the device retrains it); model.onnx is rebuilt from both. Up to
    300 rows drawn across classes (seeded) calibrate: the training rows, else half the
    validation rows. Every other row judges: the quantized model must keep 99% of the fp32
    top-1 answers on the 95% lower bound, and lose at most 0.5 point of accuracy on the
    labelled held-out rows; with too few rows to certify that (about 300 with no flip) it
    says how many it needs (add --parity-data) and writes nothing (exit 1). When int8 misses,
    the search keeps the nodes it hurts most in float until it holds (at most half of them);
    a budget that still cannot be met fails with the numbers and writes nothing (exit 1).
    quantize.json holds sizes, the rows drawn to calibrate and those that judged, parity,
    what was kept in float and batch-1 latency.
    """
    from .config import QuantizeConfig
    from .quantize import quantize as run_quantize

    r = run_quantize(QuantizeConfig(export_dir, mode, output, calibration=calibration, text_column=text_column,
                                    label_column=label_column, per_channel=per_channel, overwrite=overwrite,
                                    min_agreement=min_agreement, max_drop=max_drop, search=search,
                                    parity_data=parity_data, uncertified=uncertified))
    b, p, lat = r.files["backbone.onnx"], r.parity, r.latency
    drop = f"  accuracy drop {100 * p['accuracy_drop']:.1f} pt" if "accuracy_drop" in p else ""
    c = r.calibration
    calibrated = f"  {c['rows']} of {c['of']} rows of {c['data']} drawn to calibrate ({c['used']})" if c else ""
    click.echo(f"quantize  ok  {r.seconds:.1f} s  {mode}  backbone.onnx {b['bytes'] / 1e6:.1f} MB "
               f"(fp32 {b['fp32_bytes'] / 1e6:.1f} MB)  agreement {p['agreement']:.1%} on {p['rows']} rows "
               f"({' + '.join(f'{n} {s}' for s, n in p.get('sources', {}).items())}), at least "
               f"{p['bounds']['agreement_lower']:.1%} at 95%{'' if p.get('certified') else ' (uncertified)'}{drop}"
               f"{calibrated}  {lat['quantized_ms']:.1f} ms vs {lat['fp32_ms']:.1f} ms  -> {output}")
    if r.kept_float:
        cost = r.search.get("cost", {})
        click.echo(f"  kept in float: {len(r.kept_float)} of {r.search['nodes']} nodes "
                   f"(+{cost.get('extra_bytes', 0) / 1e6:.1f} MB, {cost.get('extra_ms', 0):+.2f} ms vs all-int8): "
                   + ", ".join(r.kept_float))

@main.group(cls=Group)
def keys():
    """Key pairs for signing bundles."""


@keys.command("generate")
@output_option("Folder for owner.key (private, mode 0600) and owner.pub.")
def keys_generate(output):
    """Make an EC P-256 key pair for signing bundles (offline).

    \b
    Example:
      edgeft keys generate --output keys/
      edgeft build runs/maint --device raspberry-pi-5 --sign keys/owner.key -o bundles/pi5
    Keep owner.key off the devices; install owner.pub on them (see edgeft device install).
    """
    from .runtime.trust import generate_keys

    priv, pub = generate_keys(output)
    click.echo(f"keys  ok  private {priv}  public {pub}")


@main.command("sign")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="The owner's private key (PEM, EC).")
def sign_cmd(bundle, key):
    """Sign every file of a bundle as built (OpenSSF model-signing, Sigstore format, offline).

    \b
    Example:
      edgeft sign bundles/pi5 --key keys/owner.key

    The signature (owner.sig) covers owner-manifest.json, a frozen copy of the build's
    manifest, and every file it lists. Heads the device retrains later are recorded in
    manifest.json with their data hashes and do not break the owner's signature.
    """
    from .runtime.trust import sign

    sig = sign(bundle, key)
    click.echo(f"sign  ok  {sig}")


@device.command("install")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", type=click.Path(file_okay=False))
@public_key_option
@click.option("--max-size-mb", type=int, help="Refuse archives that unpack past this size.  [default: 4096, or the policy's]")
@click.option("--replace", is_flag=True, help="Swap out an installed bundle at TARGET.")
def device_install(archive, target, public_key, max_size_mb, replace):
    """Install a .tar.gz bundle safely and atomically.

    \b
    Example:
      edgeft device install pi5.tar.gz /opt/edgeft/bundle --public-key /etc/edgeft/owner.pub

    Refuses absolute paths, '..', links, device files and archives that unpack past the size
    limit; checks the signature (with --public-key or when the device policy requires it)
    and every hash before the bundle is moved into place in one rename.
    """
    from .runtime.install import install

    path = install(archive, target, public_key, (max_size_mb << 20) if max_size_mb else None, replace)
    click.echo(f"install  ok  -> {path}")


def _report_table(report: dict) -> str:
    lines = [f"{'label':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'n':>5}"]
    for name, c in report["per_class"].items():
        lines.append(f"{name:<16} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>6.3f} {c['support']:>5}")
    lines.append(f"accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}  rows {report['rows']}")
    return "\n".join(lines)


@main.command()
@click.option("--output", "-o", default="edgeft-demo", show_default=True, help="Folder for everything the demo makes.")
@click.option("--force", is_flag=True, help="Redo every step, even those whose output is current.")
def demo(output, force):
    """Run the built-in example end to end, offline, with the real all-MiniLM-L6-v2.

    Trains a maintenance-log router (6 teams) with LoRA, merges, exports, builds bundles for
    a Raspberry Pi 5 and a Jetson Orin Nano, verifies them against PyTorch on held-out
    entries, then teaches the Pi's bundle a 7th team from 40 samples with the torch-free
    device retrain. It is examples/maintenance/recipe.toml; a rerun skips current steps.
    """
    from .demo import run_demo
    from .recipe import summary_table

    s = run_demo(output, force)
    click.echo(summary_table(s))
    click.echo(f"demo  ok  {s['seconds']:.1f} s  -> {output}/summary.json")


@main.command("run")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--output", "-o", help="Output folder.  [default: the recipe's `output`]")
@click.option("--force", is_flag=True, help="Redo every step, even those whose output is current.")
def run_cmd(recipe, output, force):
    """Run a recipe: train, merge, export, build per device, verify, device retrain.

    \b
    Example:
      edgeft run examples/maintenance/recipe.toml

    Each step writes its own folder under the recipe's output; a step whose output is
    current is skipped; a failing step stops the chain. Ends with a summary table and
    summary.json (accuracy, parity, size and latency per device).
    """
    from .recipe import run_recipe, summary_table

    s = run_recipe(recipe, force=force, output=output)
    click.echo(summary_table(s))
    click.echo(f"run  ok  {s['seconds']:.1f} s  -> {s['output']}/summary.json")


if __name__ == "__main__":
    main()
