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
    # x86-64-server names no ISA features: any x86-64 host is its class, so the build timed the variants
    from edgeft.quantize.isa import host

    assert q["chosen_by"]["method"] == ("timed" if host()["arch"] == "x86-64" else "timed, host of another class")
    assert q["chosen_by"]["host"]["model"] == host()["model"]


@pytest.mark.slow
def test_a_pi_bundle_built_on_x86_follows_the_documented_order(lora_text_run, tmp_path):
    from edgeft.build import build
    from edgeft.quantize.isa import host

    if host()["arch"] != "x86-64":
        pytest.skip("the point is a build host of another class than the Pi's")
    m = build(lora_text_run, "raspberry-pi-5", tmp_path / "b", uncertified=True, emulate=False).manifest
    how = m["quantization"]["chosen_by"]
    assert how["method"] == "documented order" and how["order_for"] == "arm64"
    passing = [t["mode"] for t in m["quantization"]["tried"] if t["passed"]]
    order = how["order"]  # a mode the order does not list ranks after every listed one (isa.choose)
    assert m["quantization"]["mode"] == min(passing, key=lambda mode: order.index(mode) if mode in order else len(order))


@pytest.mark.slow
def test_the_mobile_int8_bundle_stays_unfused(lora_text_run, tmp_path):
    from edgeft.build import build

    phone = tmp_path / "phone.toml"
    phone.write_text('description = "test phone"\ntarget = "mobile"\nprecision = "int8"\nmax_length = 32\n')
    m = build(lora_text_run, str(phone), tmp_path / "b", uncertified=True).manifest
    assert all(t["mode"] != "dynamic-fused" for t in m["quantization"]["tried"]) and "fusion" not in m["quantization"]
    # the ORT-format conversion applies ONNX Runtime's own session fusions (SkipLayerNormalization,
    # Gelu: the reduced build compiles what the config lists); the transformer optimizer's attention
    # and embedding fusions appear only from the fused mode
    config = (tmp_path / "b" / "mobile" / "required_operators.config").read_text()
    ops = {op for line in config.splitlines() if not line.startswith("#") for op in line.split(";")[-1].split(",")}
    assert not ops & {"Attention", "QAttention", "EmbedLayerNormalization", "QEmbedLayerNormalization"}, ops


# ---------------------------------------------------------------- choosing for the target, not the host

AMD = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni avx512_bf16\n"
ARM_A76 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
OLD_XEON = "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4\nflags\t\t: fpu sse4_2 avx avx2 fma\n"


def test_host_class_from_cpuinfo():
    from edgeft.quantize.isa import host

    assert host(AMD, "x86_64") == {"arch": "x86-64", "model": "AMD EPYC", "class": "x86-64/vnni",
                                   "features": ["avx2", "avx512_bf16", "avx512_vnni", "avx512f"]}
    assert host(OLD_XEON, "x86_64")["class"] == "x86-64/avx2"
    a76 = host(ARM_A76, "aarch64")
    assert a76["class"] == "arm64/dotprod" and a76["features"] == ["dotprod", "neon"]


def test_profiles_name_their_isa(tmp_path):
    from edgeft.errors import ProfileError
    from edgeft.profiles import find_profile, read_profile
    from edgeft.quantize.isa import profile_isa

    assert profile_isa(find_profile("raspberry-pi-4")[0])["class"] == "arm64/neon"
    assert profile_isa(find_profile("raspberry-pi-5")[0])["class"] == "arm64/dotprod"
    assert profile_isa(find_profile("intel-n100")[0])["class"] == "x86-64/vnni"
    generic = profile_isa(find_profile("x86-64-server")[0])  # "AVX2 or newer": any x86-64 host is its class
    assert generic["arch"] == "x86-64" and generic["class"] is None
    bad = tmp_path / "bad.toml"
    bad.write_text('target = "cpu"\narch = "arm64"\nisa = ["neon", "avx512_vnni"]\n')
    with pytest.raises(ProfileError, match=r"isa: 'avx512_vnni' is not an arm64 feature"):
        read_profile(bad)
    bad.write_text('target = "cpu"\nisa = ["avx2"]\n')
    with pytest.raises(ProfileError, match="isa: needs arch"):
        read_profile(bad)


def _passing(*modes_ms):
    return [{"mode": m, "latency_ms": ms, "kept_float": []} for m, ms in modes_ms]


def test_the_build_host_ranks_only_devices_of_its_class():
    from edgeft.profiles import find_profile
    from edgeft.quantize.isa import choose, host

    cpu = get_target("cpu")
    amd = host(AMD, "x86_64")
    passing = _passing(("dynamic", 1.0), ("dynamic-fused", 0.9), ("weight-only", 0.7))
    # a generic x86-64 profile on an x86-64 host: timed, the fastest wins
    best, how = choose(passing, find_profile("x86-64-server")[0], cpu, amd)
    assert best["mode"] == "weight-only" and how["method"] == "timed"
    # a Raspberry Pi 5 built on this x86 host: the plugin's documented Arm order, not the host's timings
    best, how = choose(passing, find_profile("raspberry-pi-5")[0], cpu, amd)
    assert best["mode"] == "dynamic-fused" and how["method"] == "documented order"
    assert how["order_for"] == "arm64" and how["source"] and how["fastest_on_host"] == "weight-only"
    assert "x86-64/vnni" in how["said"]
    # the same Pi built on an Arm host with the dot product: timed there
    assert choose(passing, find_profile("raspberry-pi-5")[0], cpu, host(ARM_A76, "aarch64"))[1]["method"] == "timed"
    # a class the target documents no order for: the host's timings, and the build says so
    best, how = choose(passing, find_profile("intel-n100")[0], cpu, host(OLD_XEON, "x86_64"))
    assert best["mode"] == "weight-only" and how["method"] == "timed, host of another class"


def test_x86_without_vnni_gets_7_bit_weights(tmp_path):
    """A profile that says its x86-64 CPU has no VNNI: weights quantize to 7 bits (reduce_range), so
    its u8 x s8 kernels cannot saturate; a VNNI or Arm profile keeps full 8-bit weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.profiles import find_profile, read_profile
    from edgeft.quantize import quantize_model
    from edgeft.quantize.isa import reduce_range

    old = tmp_path / "old-xeon.toml"
    old.write_text('target = "cpu"\narch = "x86-64"\nisa = ["avx2"]\n')
    assert reduce_range(read_profile(old))
    assert not any(reduce_range(find_profile(n)[0]) for n in ("raspberry-pi-4", "intel-n100", "x86-64-server"))

    w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                          initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    for rr, limit in ((False, 127), (True, 64)):
        info = quantize_model(tmp_path / "m.onnx", tmp_path / f"q{rr}.onnx", "dynamic", modality="text", reduce_range=rr)
        q = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / f"q{rr}.onnx")).graph.initializer
             if i.data_type == TensorProto.INT8]
        assert max(int(np.abs(a).max()) for a in q) == limit and info.get("reduce_range", False) == rr
