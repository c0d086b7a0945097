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


@dataclass(frozen=True)
class TargetSpec:
    """One entry of the target matrix: a profile, the name its folder gets, and per-target overrides
    (see `edgecomp.profile.load_profile`). `--target NAME` is `TargetSpec(NAME)`."""

    profile: str
    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    where: str | None = None  # how errors name it (a build file's `targets[2]`)


@dataclass
class BuildRequest:
    model: str
    targets: tuple[str | TargetSpec, ...]
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
    cache: Path | None = None  # stage cache root (edgecomp.cache); None: every stage is made afresh
    remeasure: bool = False  # measure latency even where the cache holds a measurement of these very artifacts
    baseline: Path | None = None  # a previous release's manifest.json: the regression gate compares with it
    gate: Any = None  # edgecomp.release.Gate; None: its defaults
    build_file: dict[str, str] | None = None  # {path, sha256} of the build file this request came from


def seed_everything(seed: int, torch: bool = True) -> None:
    """Python's and numpy's generators, and torch's where `torch` (a build seeds torch only when it
    loads or trains a model: a build served from the cache never imports it)."""
    random.seed(seed)
    np.random.seed(seed)
    if torch:
        import torch as _torch

        _torch.manual_seed(seed)


def resolve_targets(targets: tuple[str | TargetSpec, ...]) -> list[Profile]:
    profiles = []
    for i, t in enumerate(targets):
        if isinstance(t, str) and t in targets[:i]:  # `-t X -t X` is one target
            continue
        t = TargetSpec(t) if isinstance(t, str) else t
        profiles.append(load_profile(t.profile, t.overrides, t.name, t.where))
    names = [p.name for p in profiles]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"target {dupes[0]!r} is given twice; give each entry of the matrix its own name")
    return profiles


@dataclass
class Source:
    """The model every target is lowered from (build-level passes done), the samples, and the
    reference outputs: the `source` stage's output, made afresh or read from the cache."""

    model: ModelHandle
    samples: SampleSet
    recipe: Any
    task: str | None
    ref_outputs: list[dict[str, np.ndarray]]
    sections: dict[str, Any]  # the report's model, data, seeds and reference entries
    key: str
    ref_runner: Callable[[], Any]  # made on first call: a cached source loads the original only when latency needs it


def build(req: BuildRequest, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from edgecomp.backends import require
    from edgecomp.cache import Cache
    from edgecomp.release import Gate, read_baseline

    profiles = resolve_targets(req.targets)
    if not profiles:
        raise UsageError("no target given: pass --target NAME (see `edgecomp targets`)")
    backends = {p.backend: require(p.backend) for p in profiles}
    check_destination(req.out)
    if req.samples is not None and not req.samples.is_file():
        raise UsageError(f"--samples {req.samples}: no such file")
    baseline = read_baseline(req.baseline) if req.baseline is not None else None
    threads = req.threads or max(p.threads for p in profiles)
    seed_everything(req.seed, torch=False)
    cache = Cache(req.cache)
    from edgecomp import report as rep

    with atomic_dir(req.out) as stage:
        work = stage / ".work"
        work.mkdir()
        src = _source(req, profiles, work, cache, threads, progress)
        report = rep.new_report(req.command) | src.sections
        report["environment"] = rep.environment()
        report["build_file"] = req.build_file
        report["targets"], runners = [], []
        for profile in profiles:
            progress(f"building {profile.name}")
            target, runner = _target(src, profile, backends[profile.backend], stage, work, req, cache)
            report["targets"].append(target)
            runners.append(runner)
        if req.bench:
            _latency(report, src, runners, profiles, cache, req, progress)
        report["cache"] = {"root": str(req.cache) if req.cache else None, "stages": cache.events}
        if baseline is not None:
            from edgecomp.release import compare, manifest

            report["gate"] = compare(baseline, manifest(report), req.gate or Gate(), str(req.baseline))
        report["ok"] = all(t["verdict"]["ok"] for t in report["targets"]) and report.get("gate", {}).get("ok", True)
        import shutil

        shutil.rmtree(work)
        for t in report["targets"]:  # where the artifacts will be, not the staging folder they are written in
            t["artifact"]["folder"] = str(req.out / t["target"])
        report["out"] = str(req.out)
        rep.write(report, stage)
    return report


def _source(req: BuildRequest, profiles: list[Profile], work: Path, cache: Any, threads: int,
            progress: Callable[[str], None]) -> Source:
    """Load, torch passes, export, build-level graph passes, reference outputs; cached as one stage.
    A profile with a torch-level pass needs the torch module itself, so it bypasses the cache."""
    from edgecomp.cache import key, toolchain
    from edgecomp.passes import PASSES
    from edgecomp.reference import reference_runner
    from edgecomp.validate import run_all

    _split_levels(req.passes, "torch")  # unknown pass names fail before anything is hashed or loaded
    k = key("source", _source_inputs(req), toolchain())
    needs_torch = any(PASSES[p["name"]].level == "torch" for prof in profiles for p in prof.passes)
    hit = None if needs_torch else cache.get("source", k, "source")
    if hit is not None:
        progress("reading the model from the cache")
        return _cached_source(req, work, k, threads, *hit)
    progress("loading model")
    seed_everything(req.seed)
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
    progress("running the reference")
    ref_runner = reference_runner(reference_model, threads)
    ref_outputs = run_all(ref_runner, samples.validation)
    sections = {
        "model": {"name": model.name, "provenance": model.provenance,
                  "inputs": [t.to_json() for t in model.inputs], "outputs": [t.to_json() for t in model.outputs],
                  "source_onnx_sha256": sha256_file(model.onnx_path)},
        "data": {"origin": samples.origin, "synthetic": samples.synthetic, "note": samples.note,
                 "calibration_samples": len(samples.calibration), "validation_samples": len(samples.validation),
                 "task": task},
        "seeds": {"build": req.seed, "recipe": recipe.seed if recipe else None},
        "reference": {"kind": "torch-eager" if reference_model.torch_module is not None else "onnxruntime-fp32",
                      "runtime": ref_runner.info(), "latency": None},
    }
    if not needs_torch:
        _put_source(cache, k, work / "cache-source", model, samples, ref_outputs, sections, recipe)
    return Source(model, samples, recipe, task, ref_outputs, sections, k, lambda: ref_runner)


def _source_inputs(req: BuildRequest) -> dict[str, Any]:
    """Everything the source stage is made from, by content: the model and samples files are hashed,
    a recipe by its TOML and its data folder (its code is in the toolchain's code hash)."""
    from edgecomp.cache import sha256_path
    from edgecomp.paths import MODELS_DIR
    from edgecomp.recipe import is_recipe

    path = Path(req.model)
    if path.is_file() and path.suffix.lower() == ".onnx":  # the graph and the external-data files it names
        try:
            model = {"content": {n: sha256_path(f) for n, f in _onnx_files(path).items()}}
        except Exception:  # unreadable: the loader will say why, in one line
            model = {"content": sha256_path(path)}
    elif path.exists():
        model = {"content": sha256_path(path)}
    elif is_recipe(req.model):
        model = {"recipe": req.model, "toml": sha256_path(MODELS_DIR / f"{req.model}.toml"),
                 "data": sha256_path(MODELS_DIR / "data") if (MODELS_DIR / "data").is_dir() else None}
    else:
        raise UsageError(f"{req.model}: no such file or directory, and not a recipe name (see `edgecomp inspect --help`)")
    if req.recipe:
        from edgecomp.recipe import load_recipe

        model["data_recipe"] = sha256_path(load_recipe(req.recipe).path)
    return {"model": model, "samples": sha256_path(req.samples) if req.samples else None,
            "inputs": [t.to_json() for t in req.inputs] if req.inputs else None, "seed": req.seed,
            "trust_remote_code": req.trust_remote_code, "passes": [[n, p] for n, p in req.passes]}


def _put_source(cache: Any, k: str, scratch: Path, model: ModelHandle, samples: SampleSet,
                ref_outputs: list[dict[str, np.ndarray]], sections: dict[str, Any], recipe: Any) -> None:
    if cache.root is None:
        return
    from edgecomp.data import stack

    scratch.mkdir(parents=True)
    arrays = {f"calibration/{n}": v for n, v in stack(samples.calibration).items()} if samples.calibration else {}
    arrays |= {f"validation/{n}": v for n, v in stack(samples.validation).items()}
    arrays |= {f"reference/{n}": v for n, v in stack(ref_outputs).items()}
    if samples.labels is not None:
        arrays["labels"] = np.asarray(samples.labels)
    np.savez(scratch / "samples.npz", **arrays)
    files = {"samples.npz": scratch / "samples.npz", **_onnx_files(model.onnx_path)}
    meta = {"sections": sections, "recipe": recipe.name if recipe else None, "origin": samples.origin, "note": samples.note,
            "name": model.name, "provenance": model.provenance, "history": list(model.history),
            "inputs": [t.to_json() for t in model.inputs], "outputs": [t.to_json() for t in model.outputs],
            "onnx": model.onnx_path.name, "calibration": len(samples.calibration)}
    cache.put("source", k, files, meta)


def _onnx_files(path: Path) -> dict[str, Path]:
    """An ONNX file and the external-data files it names (all in its folder)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return {path.name: path, **{n: path.parent / n for n in sorted(names)}}


def _cached_source(req: BuildRequest, work: Path, k: str, threads: int, folder: Path, meta: dict[str, Any]) -> Source:
    import shutil

    from edgecomp.recipe import load_recipe

    local = work / "source"
    shutil.copytree(folder, local)
    with np.load(local / "samples.npz", allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}

    def feeds(prefix: str) -> list[dict[str, np.ndarray]]:
        group = {n.split("/", 1)[1]: v for n, v in arrays.items() if n.startswith(prefix + "/")}
        count = len(next(iter(group.values()))) if group else 0
        return [{n: v[i:i + 1] for n, v in group.items()} for i in range(count)]

    samples = SampleSet(feeds("calibration"), feeds("validation"), arrays.get("labels"), meta["origin"], meta["note"])
    model = ModelHandle(meta["name"], tuple(map(TensorSpec.from_json, meta["inputs"])),
                        tuple(map(TensorSpec.from_json, meta["outputs"])), meta["provenance"],
                        onnx_path=local / meta["onnx"], history=tuple(meta["history"]))
    recipe = load_recipe(meta["recipe"]) if meta["recipe"] else None
    task = meta["sections"]["data"]["task"]
    made: list[Any] = []

    def ref_runner() -> Any:  # the original model, loaded only if a latency must be measured
        if not made:
            from edgecomp.reference import reference_runner

            original, _, _ = _load(req, work / "reference")
            if original.onnx_path is None:
                original = original.replace(inputs=model.inputs, outputs=model.outputs)
            made.append(reference_runner(original, threads))
        return made[0]

    return Source(model, samples, recipe, task, feeds("reference"), meta["sections"], k, ref_runner)


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


def _target(src: Source, profile: Profile, backend: Any, stage: Path, work: Path, req: BuildRequest,
            cache: Any) -> tuple[dict[str, Any], Callable[[], Any]]:
    """One target's artifact and parity: the `target` stage, keyed by the source and everything in the
    profile that shapes the artifact or its manifest. Returns its report entry and a runner maker."""
    from edgecomp.cache import host, key, toolchain
    from edgecomp.validate import verdict

    threads = req.threads or profile.threads
    k = key("target", src.key, profile.name, profile.backend, profile.precision, profile.passes, profile.options,
            profile.budget, profile.diff, threads, toolchain(), host())
    hit = cache.get("target", k, profile.name)
    folder = stage / profile.name
    if hit is not None:
        import shutil

        from edgecomp.cache import ENTRY

        shutil.copytree(hit[0], folder, ignore=shutil.ignore_patterns(ENTRY))
        entry = hit[1]["entry"]
        entry["verdict"] = verdict(entry["parity"], profile.budget)

        def load() -> Any:
            from edgecomp.artifact import load_runner

            return load_runner(folder, threads)[0]
        runner: Callable[[], Any] = load
    else:
        entry, built = _build_target(src.model, profile, backend, stage, work, src.samples, src.ref_outputs, src.task,
                                     req, src.recipe)
        if profile.diff:
            entry["diff"] = _diff(src, folder, threads)
        cache.put("target", k, {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}, {"entry": entry})

        def runner() -> Any:
            return built
    entry["cache"] = cache.events[f"target/{profile.name}"]
    entry["stage_key"] = k
    return entry, runner


def _diff(src: Source, folder: Path, threads: int) -> dict[str, Any]:
    """Layer-by-layer error of the artifact against the graph it was lowered from, on the first validation
    sample; a runtime that cannot expose its intermediate tensors is noted, not an error."""
    from edgecomp.diff import diff

    try:
        result = diff(src.model.onnx_path, folder, src.samples.validation[0], threads)
    except UsageError as e:
        return {"skipped": str(e)}
    return result | {"a": "source graph", "b": folder.name}


def _latency(report: dict[str, Any], src: Source, runners: list[Callable[[], Any]], profiles: list[Profile],
             cache: Any, req: BuildRequest, progress: Callable[[str], None]) -> None:
    """Latency of the reference and every target in one interleaved measurement (the `latency`
    stage: these very artifacts, bench settings and machine); the verdicts then see the ratio."""
    from edgecomp.bench import interleaved, mean_ci
    from edgecomp.cache import key, toolchain
    from edgecomp.validate import verdict

    env = report["environment"]
    import platform

    k = key("latency", src.key, [t["stage_key"] for t in report["targets"]], [p.bench for p in profiles],
            [t["threads"] for t in report["targets"]], env["cpu"], env["cores"], platform.node(), toolchain())
    hit = None if req.remeasure else cache.get("latency", k, "all")
    if hit is not None:
        lats = hit[1]["latency"]
    else:
        progress("measuring latency (reference and targets interleaved)")
        made = [src.ref_runner(), *(r() for r in runners)]
        lats = interleaved(list(zip(made, [profiles[0].bench, *(p.bench for p in profiles)])), [src.samples.validation] * len(made))
        for lat in lats:
            lat["inputs"] = len(src.samples.validation)  # timed runs cycle through the validation split
        cache.put("latency", k, {}, {"latency": lats})
    report["reference"]["latency"] = lats[0]
    for target, lat, profile in zip(report["targets"], lats[1:], profiles):
        lat["ratio_to_reference"] = lat["p50_ms"] / lats[0]["p50_ms"]
        lat["round_ratios"] = [t / r for t, r in zip(lat["round_p50_ms"], lats[0]["round_p50_ms"])]
        lat["ratio_ci95"] = list(mean_ci(lat["round_ratios"])[1:])
        lat["cache"] = cache.events.get("latency/all", "off") if not req.remeasure else "remeasured"
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
        "parity": par, "latency": None, "verdict": ver, "build_seconds": time.perf_counter() - t0,
        "lowering_seconds": artifact.timings, "meta": artifact.meta,
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
