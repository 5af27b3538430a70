"""A bundle on the device: manifest checks, hash checks, then the models. numpy + onnxruntime only.

The layout and the manifest's checks are in runtime/manifest.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, DataError
from ..plugins import registry
from ..targets import Engine
from .manifest import MANIFEST, check_files, read_manifest
from .ood import FALSE_ALARM, OOD, from_ridge_statistics
from .preprocess import load_preprocessor
from .session import OnnxModel
from .trust import enforce

# how far a quantized bundle's features may move on another CPU's int8 kernels: a few int8 steps
# (a step is ~1% of a tensor's range); measured: x86 vs emulated Cortex-A76, 0.5% (MiniLM int8)
FEATURE_DRIFT = 0.05


class Bundle:
    """Load a bundle after its hashes match; run it: features, logits, predictions, self-check."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 check_hashes: bool = True, public_key: str | Path | None = None, manifest: dict | None = None):
        self.path = Path(path)
        # manifest: one still in memory (edgeft build runs its bundle before writing it; no hashes yet)
        self.manifest = read_manifest(self.path) if manifest is None else manifest
        if check_hashes:
            enforce(self.path, public_key)  # the owner's signature, when given a key or the policy says so
            check_files(self.path, self.manifest)
        m = self.manifest
        self.labels = list(m["labels"])
        try:
            self.pre = load_preprocessor(self.path, m["preprocessing"])
            providers, threads = self._runtime_settings(m["runtime"], providers, threads)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise BundleError(f"{self.path / MANIFEST}: unusable preprocessing or runtime settings ({type(e).__name__}: {e}).") from None
        self.engine = self._engine(m["runtime"])
        self.pow2_batches = self.engine.pow2_batches
        self.backbone = self.engine.load(self.path, m, providers, threads)
        self.head_version = m["head"]["version"]
        self.head = OnnxModel(self.path / m["head"]["file"], providers, threads)
        dims = self.head.session.get_outputs()[0].shape
        if isinstance(dims[-1], int) and dims[-1] != len(self.labels):
            raise BundleError(f"{self.path / MANIFEST}: {len(self.labels)} labels, but the head "
                              f"{m['head']['file']} has {dims[-1]} outputs.")

    def _runtime_settings(self, runtime: dict, providers, threads) -> tuple[list[str] | None, int | None]:
        """Check the manifest's runtime settings; set the batching they ask for; return the
        providers and threads to run with (the caller's, else the bundle's)."""
        providers = providers or runtime.get("providers")
        threads = threads or runtime.get("threads")
        if providers is not None and (not isinstance(providers, list) or not all(isinstance(p, str) for p in providers)):
            raise TypeError("runtime.providers must be a list of names")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or not 0 < threads <= 1024):
            raise TypeError("runtime.threads must be a small positive integer")
        batch = runtime.get("batch_size", 1)
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 < batch <= 4096:
            raise TypeError("runtime.batch_size must be a positive integer up to 4096")
        self.fixed_batch = batch if runtime.get("static_shapes") else None
        # dynamic int8 takes its activation scales from the whole batch, padding included:
        # such a bundle answers one row per call, or batch-mates would change its answers
        self.max_batch = runtime.get("max_batch")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or isinstance(self.max_batch, bool)
                                           or not 0 < self.max_batch <= 4096):
            raise TypeError("runtime.max_batch must be a positive integer up to 4096")
        return providers, threads

    def _engine(self, runtime: dict) -> Engine:
        """The runtime engine (registered by a plugin; onnxruntime is built in) the manifest names."""
        name = runtime.get("engine", "onnxruntime")
        engines = registry().engines
        if not isinstance(name, str) or name not in engines:
            raise BundleError(f"{self.path / MANIFEST}: runtime.engine {name!r} is not one this edgeft runs "
                              f"({', '.join(sorted(engines))}).")
        return engines[name]

    def _chunks(self, items, batch_size):
        step = self.fixed_batch or min(batch_size, self.max_batch or batch_size)
        for i in range(0, len(items), step):
            chunk = items[i : i + step]
            if self.fixed_batch and len(chunk) < self.fixed_batch:
                chunk = chunk + [chunk[-1]] * (self.fixed_batch - len(chunk))  # pad the last batch
            elif self.pow2_batches and len(chunk) & (len(chunk) - 1):
                # OpenVINO compiles each input shape once: a last batch of 13 runs as 16, so the
                # batch sizes seen stay 1, 2, 4, ... and nothing compiles twice for a new count
                chunk = chunk + [chunk[-1]] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))
            yield chunk, min(step, len(items) - i)

    def features(self, items: list, batch_size: int = 32) -> np.ndarray:
        out = []
        for chunk, n in self._chunks(items, batch_size):
            out.append(self.backbone(self.pre(chunk))["features"][:n])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)

    def features_from_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self.backbone(arrays)["features"]

    def head_outputs(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return self.head({"features": features.astype(np.float32)})

    def logits(self, items: list, batch_size: int = 32) -> np.ndarray:
        return self.head_outputs(self.features(items, batch_size))["logits"]

    def predict(self, items: list, batch_size: int = 32, false_alarm: float = FALSE_ALARM) -> list[dict]:
        """Label, confidence and every class's probability per input, and where the bundle has a
        replay memory its out-of-distribution score and `unknown` flag (runtime/ood.py); an
        empty input is bad input."""
        for i, item in enumerate(items, start=1):
            if not str(item).strip():
                what = "text" if self.manifest["modality"] == "text" else "image path"
                raise DataError(f"input {i}: empty {what}; give a {what} to classify.")
        feats = self.features(items, batch_size)
        probs = self.head_outputs(feats)["probs"]
        out = [{"label": self.labels[int(p.argmax())], "confidence": float(p.max()),
                "probs": {n: float(v) for n, v in zip(self.labels, p, strict=True)}} for p in probs]
        ood = self.ood(false_alarm)
        if ood is not None:
            scores, unknown = ood.flags(feats)
            for r, s, u in zip(out, scores, unknown, strict=True):
                r["ood_score"], r["unknown"] = float(s), bool(u)
        return out

    def ood(self, false_alarm: float = FALSE_ALARM) -> OOD | None:
        """The out-of-distribution scorer of the active head, from its replay memory (None without one)."""
        key = (self.head_version, false_alarm)
        if getattr(self, "_ood_key", None) != key:
            m = self.manifest
            rel = m["head"].get("replay") or next((h.get("replay") for h in m["heads"]
                                                   if h["version"] == self.head_version), None)
            self._ood = None
            if m["head"].get("family") == "ridge":  # prototypes over every learned row, from its statistics
                self._ood = from_ridge_statistics(self.path, m, false_alarm)
            if self._ood is None and rel and (self.path / rel).is_file():
                with np.load(self.path / rel, allow_pickle=False) as z:
                    if len(z["labels"]):
                        self._ood = OOD(z["features"], z["labels"], z["holdout"], len(self.labels), false_alarm)
            self._ood_key = key
        return self._ood

    def reference_features(self) -> np.ndarray:
        """The backbone's features of the bundled reference inputs, run as predict runs them."""
        inputs = np.load(self.path / "reference" / "inputs.npz")
        arrays = {k: inputs[k] for k in inputs.files}
        n = len(next(iter(arrays.values())))
        if self.max_batch == 1 and "attention_mask" in arrays and not self.fixed_batch:
            # one text per call, without the padding its batch-mates gave it, as predict runs it
            rows = []
            for i in range(n):
                width = max(1, int(arrays["attention_mask"][i].sum()))
                rows.append(self.features_from_arrays({k: v[i : i + 1, :width] for k, v in arrays.items()}))
            return np.concatenate(rows)
        step = self.fixed_batch or min(n, self.max_batch or n)
        return np.concatenate([self.features_from_arrays({k: v[i : i + step] for k, v in arrays.items()})
                               for i in range(0, n, step)])

    @staticmethod
    def _judge_quantized(report: dict, ref, got, feats, build_feats) -> None:
        """A quantized bundle on another CPU: its int8 kernels round otherwise (x86 VNNI, Arm
        dotprod), so a reference row chosen for its small margin (certify.reference_rows puts
        the smallest quarter first) may flip; any other row may not, and the features must
        stay within FEATURE_DRIFT of their scale of what the build computed."""
        from .stats import margins

        scale = float(np.abs(build_feats).max()) or 1.0
        drift = float(np.abs(feats - build_feats).max()) / scale
        report["checks"].append({"name": "features", "passed": drift <= FEATURE_DRIFT, "value": drift,
                                 "limit": FEATURE_DRIFT,
                                 "message": f"features within {drift:.2%} of their scale of the build's "
                                            f"(at most {FEATURE_DRIFT:.0%})"})
        m = margins(ref)
        near = set(np.argsort(m, kind="stable")[: max(1, len(m) // 4)].tolist())
        flipped = np.flatnonzero(ref.argmax(1) != got.argmax(1)).tolist()
        report["near_tie_flips"] = [{"row": i, "build_margin": float(m[i])} for i in flipped]
        entry = next(c for c in report["checks"] if c["name"] == "agreement")
        if flipped and not entry["passed"] and drift <= FEATURE_DRIFT and set(flipped) <= near:
            entry["passed"] = True
            entry["message"] += (f"; each on one of the {len(near)} smallest-margin reference rows (build margin at "
                                 f"most {max(m[i] for i in flipped):.3g}), features close: this CPU's int8 rounding")

    def check(self, thresholds=None) -> dict:
        """Run the bundled reference inputs here and compare with what the build recorded.

        fp32: against PyTorch's outputs (they must match to 1e-4). int8/fp16: a quantized
        bundle differs from PyTorch by design, and the build measured by how much on all its
        parity rows (parity.json); 16 reference rows cannot re-judge that (one changed answer
        is 6%). So the question here is whether this device runs the bundle as the build did:
        its answers against the bundle's own outputs recorded at build time, all equal.
        Agreement with PyTorch on these rows is reported beside it.
        """
        from .compare import Thresholds, checks, compare

        expected = np.load(self.path / "reference" / "outputs.npz")
        feats = self.reference_features()
        got = self.head_outputs(feats)["logits"]
        quantized = self.manifest["precision"] != "fp32" and "bundle_features" in expected.files
        build_head = self.head_version == self.manifest["heads"][0]["version"]
        if quantized:
            ref = self.head_outputs(expected["bundle_features"])["logits"]
            t = thresholds or Thresholds(max_abs_diff=None, min_agreement=1.0)
        else:
            ref = expected["logits"]
            if not build_head:
                # a head retrained on the device is not the one PyTorch computed at build time:
                # check the backbone's features, and the head against its own recorded outputs
                ref = self.head_outputs(expected["features"])["logits"]
            t = thresholds or Thresholds.for_precision(self.manifest["precision"])
            # the build's own float32 limit for this model (edgeft/float32.py: PyTorch's float32
            # error against float64, 5 times, plus 16 ulps of the logits' scale), where it recorded
            # one; it is the build head's: a head retrained here has logits of another scale
            limit = (self.manifest.get("parity") or {}).get("max_abs_diff_limit") if build_head else None
            if thresholds is None and isinstance(limit, int | float) and not isinstance(limit, bool) and 0 < limit < 1:
                t = t.override(max_abs_diff=float(limit))
        report = compare(ref, got, labels=self.labels)
        report["against"] = "the bundle's outputs at build time" if quantized else "PyTorch's outputs at build time"
        if quantized and build_head:
            report["pytorch_agreement"] = float((expected["logits"].argmax(1) == got.argmax(1)).mean())
        report["checks"] = checks(report, t)
        if quantized and thresholds is None:
            self._judge_quantized(report, ref, got, feats, expected["bundle_features"])
        report["passed"] = all(c["passed"] for c in report["checks"])
        report["providers"] = self.backbone.describe() if hasattr(self.backbone, "describe") else [self.engine.name]
        report["precision"] = self.manifest["precision"]
        report["head_version"] = self.head_version
        if "features" in expected.files:
            report["features_max_abs_diff"] = float(np.abs(feats - expected["features"]).max())
        return report
