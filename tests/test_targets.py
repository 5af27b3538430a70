"""Targets and the quantization variants a build tries for them (edgeft.quantize.registry.variants_for)."""

from __future__ import annotations

import json

import pytest

from edgeft.plugins import get_target
from edgeft.quantize import get, variants_for
from edgeft.targets import Target


def test_only_targets_with_fused_ops_get_fused_variants():
    """The cpu target runs the full onnxruntime wheel (contrib operators): it tries the fused
    transformer graph. The mobile target's reduced-operator build, Jetson's TensorRT and a
    third-party target that says nothing do not."""
    cpu, mobile = get_target("cpu"), get_target("mobile")
    assert cpu.fused_ops and not mobile.fused_ops and not get_target("jetson").fused_ops
    assert "dynamic-fused" in variants_for(cpu, "int8", "text")
    assert "dynamic-fused" not in variants_for(mobile, "int8", "text")
    assert "dynamic-fused" not in variants_for(Target("acme", "a plain ONNX consumer", precision="int8"), "int8", "text")
    # fusion is for transformer text backbones: never offered for an image model
    assert all(get(v, engine=None).fuse is None for v in variants_for(cpu, "int8", "image"))
    # a target's own list is filtered the same way
    own = Target("acme", "lists a fused mode", precision="int8", variants={"int8": ("dynamic-fused", "dynamic")})
    assert variants_for(own, "int8", "text") == ("dynamic",)


def test_the_cpu_text_bundle_reports_what_fused(device_bundles):
    """The x86-64-server bundle of the tiny BERT (target cpu): the fused variant was tried, and
    what fused is in the manifest's quantization entry (of the winner when it won)."""
    m = json.loads((device_bundles["text"] / "manifest.json").read_text())
    q = m["quantization"]
    fused = next(t for t in q["tried"] if t["mode"] == "dynamic-fused")
    assert fused["fusion"]["fused"]["Attention"] == 2 and fused["fusion"]["passed"]
    if q["mode"] == "dynamic-fused":
        assert q["fusion"]["fused"] == fused["fusion"]["fused"]


@pytest.mark.slow
def test_the_mobile_int8_bundle_stays_unfused(lora_text_run, tmp_path):
    from edgeft.build import build

    phone = tmp_path / "phone.toml"
    phone.write_text('description = "test phone"\ntarget = "mobile"\nprecision = "int8"\nmax_length = 32\n')
    m = build(lora_text_run, str(phone), tmp_path / "b")
    assert all(t["mode"] != "dynamic-fused" for t in m["quantization"]["tried"])
    ops = (tmp_path / "b" / "mobile" / "required_operators.config").read_text()
    assert "Attention" not in ops and "SkipLayerNormalization" not in ops, ops
