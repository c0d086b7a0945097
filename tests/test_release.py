"""Release pipelines: build files, the stage cache, reproducible manifests, the regression gate."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest

from conftest import EDGECOMP, ROOT, run_cli
from edgecomp.buildfile import load_build_file
from edgecomp.errors import UsageError
from edgecomp.model import sha256_file
from edgecomp.release import Gate, compare

TARGETS = ("ort-fp32", "ort-int8", "tflite-fp32")


def write_build_file(folder: Path, model: Path, samples: Path, extra: str = "", int8_budget: str = "") -> Path:
    targets = "".join(f'\n[[targets]]\nprofile = "{t}"\n' for t in TARGETS)
    if int8_budget:
        targets = targets.replace('profile = "ort-int8"\n', f'profile = "ort-int8"\nbudget = {{ {int8_budget} }}\n')
    path = folder / "edgecomp.toml"
    path.write_text(f'schema = 1\nout = "out"\n\n[model]\nsource = "{model}"\nsamples = "{samples}"\nseed = 3\n'
                    f'{targets}{extra}')
    return path


def release(build_file: Path, *args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli("release", build_file, "--cache-dir", cache, *args, timeout=timeout)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def without_created(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "created"}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, tiny_samples: Path) -> dict:
    """One release into a fresh cache, then the same release again."""
    root = tmp_path_factory.mktemp("release")
    bf = write_build_file(root, tiny_onnx, tiny_samples)
    cache = root / "cache"
    r1 = release(bf, cache=cache)
    assert r1.returncode == 0, r1.stderr
    m1, rep1 = manifest(root / "out"), report(root / "out")
    r2 = release(bf, cache=cache)
    assert r2.returncode == 0, r2.stderr
    return {"root": root, "bf": bf, "cache": cache, "m1": m1, "rep1": rep1, "m2": manifest(root / "out"),
            "rep2": report(root / "out")}


def test_first_release_makes_every_stage_and_writes_the_manifest(first: dict) -> None:
    stages = first["rep1"]["cache"]["stages"]
    assert set(stages) == {"source/source", "latency/all", *(f"target/{t}" for t in TARGETS)}
    assert set(stages.values()) == {"miss"}
    m = first["m1"]
    assert m["schema"] == "edgecomp.release/1"
    assert m["build_file"]["sha256"] == sha256_file(first["bf"])
    assert [t["target"] for t in m["targets"]] == list(TARGETS)
    for t in m["targets"]:
        out = first["root"] / "out" / t["target"]
        for f in t["files"]:
            assert f["sha256"] == sha256_file(out / f["name"])
        assert t["latency"]["p50_ms"] > 0 and len(t["latency"]["round_ratios"]) == 5
        assert t["verdict"]["ok"]
    assert m["tools"]["onnxruntime"] and m["seeds"]["build"] == 3
    assert (first["root"] / "out" / "report.html").stat().st_size > 5000


def test_second_release_reuses_every_stage_and_gives_the_same_manifest(first: dict) -> None:
    assert set(first["rep2"]["cache"]["stages"].values()) == {"hit"}
    assert without_created(first["m2"]) == without_created(first["m1"])


def test_changing_one_target_rebuilds_only_that_target(first: dict, tiny_onnx: Path, tiny_samples: Path) -> None:
    bf = write_build_file(first["root"], tiny_onnx, tiny_samples, int8_budget="cosine_mean = 0.9991")
    r = release(bf, cache=first["cache"])
    assert r.returncode == 0, r.stderr
    stages = report(first["root"] / "out")["cache"]["stages"]
    assert stages["source/source"] == "hit"
    assert stages["target/ort-fp32"] == stages["target/tflite-fp32"] == "hit"
    assert stages["target/ort-int8"] == "miss"
    assert stages["latency/all"] == "miss"  # latencies of one interleaved run: measured again together
    int8 = next(t for t in manifest(first["root"] / "out")["targets"] if t["target"] == "ort-int8")
    assert {"metric": "cosine_mean", "limit": 0.9991} in [{k: c[k] for k in ("metric", "limit")} for c in int8["verdict"]["checks"]]
    write_build_file(first["root"], tiny_onnx, tiny_samples)  # back to the file the other tests use


def test_a_cache_shared_by_unlike_cpus_keeps_their_int8_apart(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A target stage made where int8 products saturate (7-bit weights, parity measured there) is not
    served to a CPU where they do not, and is served again to a CPU like the one that made it."""
    from edgecomp.passes import _int8
    from edgecomp.pipeline import BuildRequest, build

    reports = []
    for i, saturates in enumerate((True, False, True)):
        monkeypatch.setattr(_int8, "saturating_cpu", lambda *a, s=saturates: s)
        reports.append(build(BuildRequest(model=str(tiny_onnx), targets=("ort-int8",), out=tmp_path / f"out{i}",
                                          samples=tiny_samples, bench=False, cache=tmp_path / "cache")))
    bits = [next(p for p in r["targets"][0]["passes"] if p["pass"] == "quantize-dynamic")["weight_bits"] for r in reports]
    assert bits == [7, 8, 7]
    assert [r["cache"]["stages"]["target/ort-int8"] for r in reports] == ["miss", "miss", "hit"]
    assert [r["cache"]["stages"]["source/source"] for r in reports] == ["miss", "hit", "hit"]


def test_a_clean_release_gives_byte_identical_artifacts(first: dict, tmp_path: Path) -> None:
    r = run_cli("release", first["bf"], "--no-cache", "--no-bench", "--out", tmp_path / "clean")
    assert r.returncode == 0, r.stderr
    again = {t["target"]: {f["name"]: f["sha256"] for f in t["files"]} for t in manifest(tmp_path / "clean")["targets"]}
    before = {t["target"]: {f["name"]: f["sha256"] for f in t["files"]} for t in first["m1"]["targets"]}
    assert again == before  # model.onnx, model.tflite, manifest.json and reference.npz alike


def test_gate_names_the_target_that_regressed(first: dict, tmp_path: Path) -> None:
    base = copy.deepcopy(first["m1"])
    int8 = next(t for t in base["targets"] if t["target"] == "ort-int8")
    out = next(iter(int8["parity"]["outputs"]))
    int8["parity"]["outputs"][out]["cosine_mean"] += 0.01  # the baseline was more accurate than this build
    tfl = next(t for t in base["targets"] if t["target"] == "tflite-fp32")
    steady = tfl["latency"]["ratio_to_reference"] / 100  # and a steady 100x faster, far beyond any noise
    tfl["latency"]["round_ratios"] = [steady] * len(tfl["latency"]["round_ratios"])
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(base))
    r = release(first["bf"], "--baseline", path, "--out", tmp_path / "gated", cache=first["cache"])
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "ort-int8" in line and "cosine_mean" in line and "tflite-fp32 latency regressed" in line
    assert "ort-fp32" not in line
    gate = report(tmp_path / "gated")["gate"]
    failed = {(c["target"], c["check"].split()[-1]) for c in gate["checks"] if not c["ok"]}
    assert failed == {("ort-int8", "cosine_mean"), ("tflite-fp32", "reference")}


def test_gate_passes_against_its_own_release(first: dict, tmp_path: Path) -> None:
    r = release(first["bf"], "--baseline", first["root"] / "out" / "manifest.json", "--out", tmp_path / "same",
                cache=first["cache"])
    assert r.returncode == 0, r.stderr
    gate = report(tmp_path / "same")["gate"]
    assert gate["ok"] and len(gate["checks"]) >= 3 * 3  # parity metrics and latency of every target


def test_two_releases_at_once_share_one_cache(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path) -> None:
    bf = write_build_file(tmp_path, tiny_onnx, tiny_samples)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([*EDGECOMP, "release", str(bf), "--cache-dir", str(cache), "--no-bench", "--out",
                               str(tmp_path / f"out{i}")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    shas = [{t["target"]: t["files"] for t in manifest(tmp_path / f"out{i}")["targets"]} for i in range(2)]
    assert shas[0] == shas[1]
    entries = [p for p in (cache / "target").iterdir()]
    assert len(entries) == len(TARGETS) and not any(p.name.startswith(".") for p in entries)  # no half entries left
    r = release(bf, "--no-bench", "--out", tmp_path / "out3", cache=cache)  # and a third run reads them
    assert r.returncode == 0 and set(report(tmp_path / "out3")["cache"]["stages"].values()) == {"hit"}


def test_a_corrupt_cache_entry_is_rebuilt(first: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    import shutil

    shutil.copytree(first["cache"], cache)
    for model in (cache / "target").rglob("model.onnx"):
        model.write_bytes(b"garbage")
    r = release(first["bf"], "--no-bench", "--out", tmp_path / "out", cache=cache)
    assert r.returncode == 0, r.stderr
    stages = report(tmp_path / "out")["cache"]["stages"]
    assert stages["target/ort-fp32"] == stages["target/ort-int8"] == "miss" and stages["target/tflite-fp32"] == "hit"
    assert manifest(tmp_path / "out")["targets"][0]["files"] == first["m1"]["targets"][0]["files"]


def _lat(ratios: list[float]) -> dict:
    return {"p50_ms": 1.0, "ratio_to_reference": sum(ratios) / len(ratios), "round_ratios": ratios}


def _manifest(ratios: list[float]) -> dict:
    return {"targets": [{"target": "t", "parity": {"outputs": {}}, "latency": _lat(ratios)}]}


@pytest.mark.parametrize("old, new, ok", [
    ([0.50, 0.51, 0.49, 0.50, 0.50], [0.50, 0.50, 0.51, 0.49, 0.50], True),  # unchanged
    ([0.50, 0.51, 0.49, 0.50, 0.50], [0.65, 0.66, 0.64, 0.65, 0.65], False),  # 30 % slower, tight rounds
    ([0.50, 0.90, 0.20, 0.60, 0.30], [0.65, 1.10, 0.30, 0.80, 0.40], True),  # 30 % slower, but noise explains it
    ([0.50, 0.51, 0.49, 0.50, 0.50], [0.53, 0.54, 0.52, 0.53, 0.53], True),  # 6 %: inside the 10 % allowed
])
def test_latency_gate_accounts_for_noise(old: list[float], new: list[float], ok: bool) -> None:
    result = compare(_manifest(old), _manifest(new), Gate(latency_regression=0.10))
    assert result["ok"] is ok
    assert result["checks"][0]["noise"] >= 0


@pytest.mark.parametrize("body, fragment", [
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\nbogus = 1\n', "'bogus'"),
    ('schema = 1\nout = "o"\nmystery = 1\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\n', "'mystery'"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\nsead = 1\n[[targets]]\nprofile = "ort-fp32"\n', "'sead'"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\nbudget = { cosine = 1 }\n', "'cosine'"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[targets]]\nprofile = "no-such-target"\n', "no-such-target"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[passes]]\nname = "lowrank"\nratio = "x"\n[[targets]]\nprofile = "ort-fp32"\n', "lowrank"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\n[gate]\nparity_drop = 2\n', "parity_drop"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\n[[targets]]\nprofile = "ort-fp32"\n', "twice"),
    ('schema = 2\n[model]\nsource = "digits"\n[[targets]]\nprofile = "ort-fp32"\n', "schema"),
    ('schema = 1\nout = "o"\n[model]\nsource = "digits"\n', "'targets'"),
    ('schema = 1\nout = [\n', "invalid TOML"),
])
def test_bad_build_files_name_the_key(tmp_path: Path, body: str, fragment: str) -> None:
    path = tmp_path / "edgecomp.toml"
    path.write_text(body)
    with pytest.raises(UsageError, match=None) as e:
        from edgecomp.pipeline import resolve_targets

        resolve_targets(load_build_file(path).targets)
    assert fragment in str(e.value)


def test_release_bad_input_is_one_line_and_writes_nothing(first: dict, tmp_path: Path) -> None:
    r = run_cli("release", tmp_path / "missing.toml")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such build file" in r.stderr
    before = (first["root"] / "out" / "manifest.json").read_bytes()
    r = release(first["bf"], "--baseline", tmp_path / "nope.json", cache=first["cache"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--baseline" in r.stderr
    not_manifest = tmp_path / "other.json"
    not_manifest.write_text('{"schema": "something/1"}')
    r = release(first["bf"], "--baseline", not_manifest, cache=first["cache"])
    assert r.returncode == 2 and "not an edgecomp release manifest" in r.stderr
    assert (first["root"] / "out" / "manifest.json").read_bytes() == before


def test_build_flags_and_build_file_are_one_request(tmp_path: Path, tiny_onnx: Path, tiny_samples: Path) -> None:
    """`edgecomp build` flags, written out by --emit-build-file and run by `edgecomp release`, make the
    same artifacts as the build itself."""
    flags = [tiny_onnx, "--samples", tiny_samples, "--seed", "3", *(a for t in TARGETS for a in ("-t", t)), "--no-bench"]
    r = run_cli("build", *flags, "-o", tmp_path / "b")
    assert r.returncode == 0, r.stderr
    r = run_cli("build", *flags, "-o", tmp_path / "r", "--emit-build-file", tmp_path / "edgecomp.toml")
    assert r.returncode == 0 and not (tmp_path / "r").exists(), r.stderr
    r = run_cli("build", *flags, "-o", tmp_path / "r", "--emit-build-file", tmp_path / "edgecomp.toml")
    assert r.returncode == 2 and "exists" in r.stderr  # never overwritten
    r = run_cli("release", tmp_path / "edgecomp.toml", "--no-cache", "--no-bench")
    assert r.returncode == 0, r.stderr
    files = [{t["target"]: t["files"] for t in manifest(tmp_path / o)["targets"]} for o in ("b", "r")]
    assert files[0] == files[1]


def test_emitted_build_file_round_trips_passes_and_inputs(tmp_path: Path) -> None:
    from edgecomp.buildfile import to_toml
    from edgecomp.load import parse_input_specs
    from edgecomp.passes import parse_pass_spec
    from edgecomp.pipeline import BuildRequest

    req = BuildRequest(model="digits", targets=("ort-fp32", "tflite-int8"), out=tmp_path / "o", seed=7, threads=3,
                       inputs=parse_input_specs(("image:1x1x8x8:float32",)),
                       passes=(parse_pass_spec("prune-structured:channels_ratio=0.5,recover_epochs=2"),
                               parse_pass_spec('lowrank:ratio=0.25,include=["fc", "conv"]')))
    (tmp_path / "edgecomp.toml").write_text(to_toml(req))
    back = load_build_file(tmp_path / "edgecomp.toml")
    assert (back.model, back.seed, back.threads, back.inputs, back.passes, back.out) == \
        (req.model, req.seed, req.threads, req.inputs, req.passes, req.out.resolve())
    assert [t.profile for t in back.targets] == list(req.targets)


def test_training_and_calibration_are_reproducible_byte_for_byte(tmp_path: Path) -> None:
    """Two clean releases of digits with a training pass (pruning + recovery fine-tune) and calibrated
    INT8 for ONNX Runtime, TFLite and OpenVINO (NNCF), and OpenVINO fp16: every file of every artifact
    has the same sha256."""
    targets = ("ort-int8-static", "tflite-int8", "openvino-int8", "openvino-f16")
    (tmp_path / "edgecomp.toml").write_text(
        'schema = 1\nout = "a"\n[model]\nsource = "digits"\n'
        '[[passes]]\nname = "prune-structured"\nchannels_ratio = 0.25\nrecover_epochs = 1\n'
        + "".join(f'[[targets]]\nprofile = "{t}"\n' for t in targets))
    shas = []
    for out in ("a", "b"):
        r = run_cli("release", tmp_path / "edgecomp.toml", "--no-cache", "--no-bench", "-o", tmp_path / out)
        # 1: built, but the briefly recovered student misses budgets set against the unpruned model; not this test's point
        assert r.returncode in (0, 1), r.stderr
        m = manifest(tmp_path / out)
        shas.append((m["model"]["source_onnx_sha256"], {t["target"]: t["files"] for t in m["targets"]}))
    assert shas[0] == shas[1]
    assert list(shas[0][1]) == list(targets)
    assert {f["name"] for f in shas[0][1]["tflite-int8"]} >= {"model.tflite", "manifest.json"}
    assert {f["name"] for f in shas[0][1]["openvino-int8"]} >= {"model.xml", "model.bin"}
    pruned = manifest(tmp_path / "a")["targets"][0]["passes"][0]
    assert pruned["pass"] == "prune-structured" and pruned["params_after"] < pruned["params_before"]


def test_diff_in_a_release_reaches_the_report(tiny_onnx: Path, tiny_samples: Path, tmp_path: Path) -> None:
    bf = write_build_file(tmp_path, tiny_onnx, tiny_samples)
    bf.write_text(bf.read_text().replace('profile = "ort-int8"\n', 'profile = "ort-int8"\ndiff = true\n')
                  .replace('profile = "tflite-fp32"\n', 'profile = "tflite-fp32"\ndiff = true\n'))
    r = run_cli("release", bf, "--no-cache", "--no-bench", "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    targets = {t["target"]: t for t in report(tmp_path / "out")["targets"]}
    assert "diff" not in targets["ort-fp32"]
    d = targets["ort-int8"]["diff"]
    assert d["matched"] >= 2 and all(row["cosine"] > 0.99 for row in d["tensors"])
    assert "cannot look inside tflite" in targets["tflite-fp32"]["diff"]["skipped"]
    assert "Per-layer error" in (tmp_path / "out" / "report.html").read_text()


def test_example_pipeline_and_build_file_are_valid() -> None:
    """tools/release/: the build file resolves to real profiles, and every `edgecomp` command in the CI
    example uses only options that `edgecomp release` has."""
    import re

    import yaml

    from edgecomp.pipeline import resolve_targets

    req = load_build_file(ROOT / "tools" / "release" / "edgecomp.toml")
    profiles = resolve_targets(req.targets)
    assert [p.name for p in profiles] == ["ort-fp32", "ort-int8", "openvino-int8", "tflite-arm"]
    assert profiles[3].budget["cosine_mean"] == 0.995 and profiles[1].diff
    assert req.out == (ROOT / "build" / "release").resolve()
    flow = yaml.safe_load((ROOT / "tools" / "release" / "github-actions.yml").read_text())
    steps = [s for job in flow["jobs"].values() for s in job["steps"]]
    commands = [line.strip() for s in steps for line in s.get("run", "").splitlines() if line.strip().startswith("edgecomp ")]
    assert len(commands) == 2
    help_text = run_cli("release", "--help").stdout
    for command in commands:
        for flag in re.findall(r"(--[a-z-]+)", command):
            assert flag in help_text, flag
    assert any("edge_bench.py" in s.get("run", "") for s in steps)


def test_gate_is_in_the_html_report(first: dict, tmp_path: Path) -> None:
    base = copy.deepcopy(first["m1"])
    int8 = next(t for t in base["targets"] if t["target"] == "ort-int8")
    for metrics in int8["parity"]["outputs"].values():
        metrics["cosine_min"] += 0.05
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(base))
    r = release(first["bf"], "--baseline", path, "--out", tmp_path / "g", cache=first["cache"])
    assert r.returncode == 1 and "ort-int8" in r.stderr and "cosine_min" in r.stderr
    page = (tmp_path / "g" / "report.html").read_text()
    assert "Regression gate" in page and page.count("<td class=FAIL>no</td>") == len(int8["parity"]["outputs"])
