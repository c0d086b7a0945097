"""The build: load -> (torch passes) -> export -> per target: graph passes -> lower -> validate -> report.

Everything that can be checked cheaply (targets, runtimes, the output folder, the samples) is
checked before any model is loaded, so bad input fails in a second with nothing written. All
files go to a staging folder that replaces `out` only when the whole build is done.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.data import SampleSet, check_against, from_npz, npz_signature, synthetic
from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle, TensorSpec, sha256_file
from edgecomp.output import atomic_dir, check_destination
from edgecomp.passes.context import PassContext
from edgecomp.profile import Profile, load_profile

REFERENCE_SAMPLES = 8  # real inputs + expected outputs shipped beside each artifact
MANIFEST_SCHEMA = "edgecomp.manifest/1"


@dataclass
class BuildRequest:
    model: str
    targets: tuple[str, ...]
    out: Path
    samples: Path | None = None
    recipe: str | None = None  # use this recipe's data and task for a model given as a file
    inputs: tuple[TensorSpec, ...] | None = None
    threads: int | None = None
    seed: int = 0
    trust_remote_code: bool = False
    passes: tuple[tuple[str, dict[str, Any]], ...] = ()  # build-level passes (--pass), shared by every target
    bench: bool = True
    command: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    import torch

    torch.manual_seed(seed)


def build(req: BuildRequest, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from edgecomp.backends import require

    profiles = [load_profile(t) for t in dict.fromkeys(req.targets)]
    if not profiles:
        raise UsageError("no target given: pass --target NAME (see `edgecomp targets`)")
    backends = {p.backend: require(p.backend) for p in profiles}
    check_destination(req.out)
    if req.samples is not None and not req.samples.is_file():
        raise UsageError(f"--samples {req.samples}: no such file")
    threads = req.threads or max(p.threads for p in profiles)
    seed_everything(req.seed)
    from edgecomp import report as rep

    with atomic_dir(req.out) as stage:
        work = stage / ".work"
        work.mkdir()
        progress("loading model")
        model, recipe, samples = _load(req, work)
        task = recipe.task if recipe else ("classification" if samples.labels is not None else None)
        reference_model = model  # parity is always against the model as given, before any pass
        ctx = PassContext(work / "build-passes", samples, req.seed, recipe, progress)
        for name, params in _split_levels(req.passes, "torch"):
            progress(f"pass {name}")
            model = _run_pass(model, name, params, ctx)
        if model.onnx_path is None:  # torch passes return a handle without a graph: export what they made
            progress("exporting to ONNX")
            from edgecomp.export import export_onnx

            model = export_onnx(model, samples.validation[0], work / "source" / "model.onnx")
        if reference_model.onnx_path is None:
            reference_model = reference_model.replace(inputs=model.inputs, outputs=model.outputs)
        for name, params in _split_levels(req.passes, "graph"):
            progress(f"pass {name}")
            model = _run_pass(model, name, params, ctx)
        report = rep.new_report(req.command)
        report["model"] = {"name": model.name, "provenance": model.provenance,
                           "inputs": [t.to_json() for t in model.inputs], "outputs": [t.to_json() for t in model.outputs],
                           "source_onnx_sha256": sha256_file(model.onnx_path)}
        report["data"] = {"origin": samples.origin, "synthetic": samples.synthetic, "note": samples.note,
                          "calibration_samples": len(samples.calibration), "validation_samples": len(samples.validation),
                          "task": task}
        report["seeds"] = {"build": req.seed, "recipe": recipe.seed if recipe else None}
        report["environment"] = rep.environment()

        progress("running the reference")
        from edgecomp.reference import reference_runner
        from edgecomp.validate import run_all

        ref_runner = reference_runner(reference_model, threads)
        ref_outputs = run_all(ref_runner, samples.validation)
        report["reference"] = {"kind": "torch-eager" if reference_model.torch_module is not None else "onnxruntime-fp32",
                               "runtime": ref_runner.info(), "latency": None}

        report["targets"], runners = [], []
        for profile in profiles:
            progress(f"building {profile.name}")
            target, runner = _build_target(model, profile, backends[profile.backend], stage, work, samples,
                                           ref_outputs, task, req, recipe)
            report["targets"].append(target)
            runners.append(runner)
        if req.bench:
            progress("measuring latency (reference and targets interleaved)")
            _measure(report, [ref_runner, *runners], profiles, samples.validation[0])
        report["ok"] = all(t["verdict"]["ok"] for t in report["targets"])
        import shutil

        shutil.rmtree(work)
        for t in report["targets"]:  # where the artifacts will be, not the staging folder they are written in
            t["artifact"]["folder"] = str(req.out / t["target"])
        report["out"] = str(req.out)
        rep.write(report, stage)
    return report


def _split_levels(passes: tuple[tuple[str, dict[str, Any]], ...], level: str) -> list[tuple[str, dict[str, Any]]]:
    from edgecomp.passes import PASSES, pass_module

    for name, _ in passes:
        pass_module(name)  # unknown names fail here, before any work
    return [(n, p) for n, p in passes if PASSES[n].level == level]


def _run_pass(model: ModelHandle, name: str, options: dict[str, Any], ctx: PassContext) -> ModelHandle:
    from edgecomp.passes import PASSES, make_params, pass_module

    if PASSES[name].level == "torch" and model.torch_module is None:
        raise UsageError(f"pass {name} trains the PyTorch model; {model.name} has no PyTorch source (it was given as ONNX)")
    return pass_module(name).run(model, make_params(name, options), ctx)


def _load(req: BuildRequest, work: Path) -> tuple[ModelHandle, Any, SampleSet]:
    from edgecomp.load import load_model
    from edgecomp.recipe import load_recipe

    inputs = req.inputs
    if inputs is None and req.samples is not None:
        inputs = npz_signature(req.samples)  # TorchScript and pickles carry no signature of their own
    model, recipe = load_model(req.model, work, trust_remote_code=req.trust_remote_code, inputs=inputs)
    if req.recipe:
        recipe = load_recipe(req.recipe)
    if req.samples is not None:
        samples = from_npz(req.samples, model.inputs if model.inputs else recipe.inputs)
    elif recipe is not None:
        samples = recipe.module().samples(recipe)
        if not samples.calibration or not samples.validation:
            raise UsageError(f"recipe {recipe.name}: the calibration or validation split is empty")
    else:
        samples = synthetic(model.inputs, seed=req.seed)
    if model.onnx_path is not None or req.recipe:
        check_against(samples.validation, model.inputs, f"{recipe.name if req.recipe and recipe else 'samples'} vs {req.model}")
    return model, recipe, samples


def _measure(report: dict[str, Any], runners: list[Any], profiles: list[Profile], feed: dict[str, np.ndarray]) -> None:
    """Latency of the reference and every target in one interleaved measurement; the verdicts then
    see the latency ratio."""
    from edgecomp.bench import interleaved
    from edgecomp.validate import verdict

    from edgecomp.bench import mean_ci

    lats = interleaved(list(zip(runners, [profiles[0].bench, *(p.bench for p in profiles)])), feed)
    report["reference"]["latency"] = lats[0]
    for target, lat, profile in zip(report["targets"], lats[1:], profiles):
        lat["ratio_to_reference"] = lat["p50_ms"] / lats[0]["p50_ms"]
        lat["round_ratios"] = [t / r for t, r in zip(lat["round_p50_ms"], lats[0]["round_p50_ms"])]
        lat["ratio_ci95"] = list(mean_ci(lat["round_ratios"])[1:])
        target["latency"] = lat
        target["verdict"] = verdict(target["parity"], profile.budget, lat["ratio_to_reference"])


def _build_target(model: ModelHandle, profile: Profile, backend: Any, stage: Path, work: Path, samples: SampleSet,
                  ref_outputs: list[dict[str, np.ndarray]], task: str | None,
                  req: BuildRequest, recipe: Any) -> tuple[dict[str, Any], Any]:
    """Passes, lowering, parity and the manifest of one target; returns its report entry (latency
    still to measure) and its runner."""
    from edgecomp.bench import peak_rss_mb, timed_load
    from edgecomp.validate import parity, run_all, verdict

    t0 = time.perf_counter()
    ctx = PassContext(work / profile.name, samples, req.seed, recipe)
    m = model
    for spec in profile.passes:
        m = _run_pass(m, spec["name"], {k: v for k, v in spec.items() if k != "name"}, ctx)
    folder = stage / profile.name
    artifact = backend.lower(m, profile, folder, ctx)
    threads = req.threads or profile.threads
    runner, load = timed_load(lambda: backend.load(artifact, threads))
    outputs = run_all(runner, samples.validation)
    par = parity(ref_outputs, outputs, task, samples.labels)
    ver = verdict(par, profile.budget)
    info = runner.info()
    _write_reference(folder, samples, ref_outputs)
    manifest = {"schema": MANIFEST_SCHEMA, "target": profile.name, "backend": profile.backend,
                "files": artifact.files, "reference": "reference.npz",
                "inputs": [t.to_json() for t in m.inputs], "outputs": [t.to_json() for t in m.outputs],
                "precision": profile.precision, "threads": threads, "task": task,
                "budget": {k: v for k, v in profile.budget.items() if k != "latency_ratio"},
                "meta": artifact.meta}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "target": profile.name, "backend": profile.backend, "description": profile.description,
        "precision_requested": profile.precision, "precision_executed": info.get("executed_precision", profile.precision),
        "threads": threads,
        "artifact": {"folder": str(folder), "size_bytes": sum(artifact.path(r).stat().st_size for r in artifact.files),
                     "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files]},
        "passes": [h for h in m.history], "runtime": info, "load": load, "peak_rss_mb": peak_rss_mb(),
        "parity": par, "latency": None, "verdict": ver, "build_seconds": time.perf_counter() - t0, "meta": artifact.meta,
    }, runner


def _write_reference(folder: Path, samples: SampleSet, ref_outputs: list[dict[str, np.ndarray]]) -> None:
    """A few real inputs and the reference's outputs, so the artifact can be re-checked anywhere."""
    from edgecomp.data import stack

    n = min(REFERENCE_SAMPLES, len(samples.validation))
    arrays = {f"input/{k}": v for k, v in stack(samples.validation[:n]).items()}
    arrays |= {f"output/{k}": v for k, v in stack(ref_outputs[:n]).items()}
    if samples.labels is not None:
        arrays["labels"] = np.asarray(samples.labels[:n])
    np.savez(folder / "reference.npz", **arrays)
