"""The `edgecomp` command line: a thin layer over `edgecomp.pipeline` and friends.

Exit codes: 0 ok; 1 built, but over the parity/latency budget; 2 usage error or bad input.
Every error is one line on stderr, never a traceback (`--debug` shows it). Nothing heavy is
imported at start-up, so `edgecomp --help` is instant without any runtime installed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from edgecomp import __version__
from edgecomp.errors import EdgecompError, UsageError

_DEBUG = False


def quiet_libraries() -> None:
    """Runtimes print banners and advice on import; a compiler's output should be its own (every entry point calls this)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("USE_TF", "0")  # transformers would otherwise import TensorFlow (seconds)
    os.environ.setdefault("USE_JAX", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*map(escape, r))  # "pip install 'edgecomp[ort]'" is text, not rich markup
    Console().print(table)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgecomp")
@click.option("--debug", is_flag=True, help="Show Python tracebacks on errors.")
def cli(debug: bool) -> None:
    """Compile a trained model for edge runtimes and prove it: parity and latency on every target.

    \b
    Example:
      edgecomp build minilm --target ort-int8 --out build/minilm
      edgecomp targets
    """
    global _DEBUG
    _DEBUG = debug


def _input_option(f: Any) -> Any:
    return click.option("--input", "inputs", multiple=True, metavar="NAME:SHAPE[:DTYPE]",
                        help="Input signature for formats that lack one (TorchScript, pickles), e.g. image:1x1x8x8:float32.")(f)


def _baseline_option(f: Any) -> Any:
    return click.option("--baseline", type=click.Path(path_type=Path),
                        help="A previous release's manifest.json (or its folder): exit 1 when parity or latency regressed.")(f)


@cli.command(epilog="Example: edgecomp build minilm --target ort-fp32 --target ort-int8 --out build/minilm")
@click.argument("model")
@click.option("--target", "-t", "targets", multiple=True, required=True, help="Target profile (repeatable); see `edgecomp targets`.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Output folder (replaced atomically).")
@click.option("--samples", type=click.Path(path_type=Path), help="Real inputs (.npz: one array per input, first axis = samples; optional `labels`).")
@click.option("--recipe", help="Use a recipe's data and task for a model given as a file (e.g. your own MiniLM export).")
@_input_option
@click.option("--pass", "pass_specs", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Build-level pass applied before lowering, shared by all targets (repeatable); see `edgecomp passes`.")
@click.option("--threads", type=click.IntRange(1, 256), help="Override the profiles' thread count.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice of the build.")
@click.option("--no-bench", is_flag=True, help="Skip latency measurement (parity only).")
@click.option("--trust-remote-code", is_flag=True, help="Allow unpickling a full model file: this runs code from the file.")
@_baseline_option
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Reuse and keep stage outputs here (default for build: no cache).")
@click.option("--remeasure", is_flag=True, help="Measure latency even where the cache holds a measurement.")
@click.option("--emit-build-file", type=click.Path(path_type=Path),
              help="Write these flags as a build file (for `edgecomp release`) instead of building.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def build(model: str, targets: tuple[str, ...], out: Path, samples: Path | None, recipe: str | None, inputs: tuple[str, ...],
          pass_specs: tuple[str, ...], threads: int | None, seed: int, no_bench: bool, trust_remote_code: bool,
          baseline: Path | None, cache_dir: Path | None, remeasure: bool, emit_build_file: Path | None, as_json: bool) -> int:
    """Build MODEL (a file, folder, or recipe name) for each --target, then validate and benchmark it."""
    from edgecomp.load import parse_input_specs
    from edgecomp.passes import parse_pass_spec
    from edgecomp.pipeline import BuildRequest

    req = BuildRequest(model=model, targets=targets, out=out, samples=samples, recipe=recipe,
                       inputs=parse_input_specs(inputs), passes=tuple(parse_pass_spec(p) for p in pass_specs), threads=threads, seed=seed, trust_remote_code=trust_remote_code,
                       bench=not no_bench, command=["edgecomp", *sys.argv[1:]], cache=cache_dir, remeasure=remeasure,
                       baseline=baseline)
    if emit_build_file is not None:
        from edgecomp.buildfile import to_toml
        from edgecomp.pipeline import resolve_targets

        resolve_targets(req.targets)  # an unknown target fails here, not when the file is run
        if emit_build_file.exists():
            raise UsageError(f"--emit-build-file {emit_build_file}: exists; nothing was overwritten")
        emit_build_file.write_text(to_toml(req))
        click.echo(f"build file: {emit_build_file} (run it with `edgecomp release {emit_build_file}`)")
        return 0
    return _run(req, f"edgecomp build {model}", as_json)


@cli.command(epilog="Example: edgecomp release edgecomp.toml --baseline previous/manifest.json")
@click.argument("build_file", type=click.Path(path_type=Path), default="edgecomp.toml")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output folder (default: the build file's `out`).")
@_baseline_option
@click.option("--no-cache", is_flag=True, help="Make every stage afresh and keep nothing.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Stage cache (default: $EDGECOMP_CACHE/stages or ~/.cache/edgecomp/stages).")
@click.option("--remeasure", is_flag=True, help="Measure latency even where the cache holds a measurement.")
@click.option("--no-bench", is_flag=True, help="Skip latency measurement (parity only).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def release(build_file: Path, out: Path | None, baseline: Path | None, no_cache: bool, cache_dir: Path | None,
            remeasure: bool, no_bench: bool, as_json: bool) -> int:
    """Run a build file (edgecomp.toml): the target matrix, cached stage by stage, with OUT/manifest.json,
    OUT/report.html and, with --baseline, the regression gate (exit 1 names the target that regressed).

    \b
    The schema is documented in edgecomp/buildfile.py and the README; minimal file:
      schema = 1
      out = "build/release"
      [model]
      source = "minilm"
      [[targets]]
      profile = "ort-int8"
    """
    import dataclasses

    from edgecomp.buildfile import load_build_file
    from edgecomp.cache import default_root

    req = load_build_file(build_file, out, ["edgecomp", *sys.argv[1:]])
    req = dataclasses.replace(req, cache=None if no_cache else (cache_dir or default_root()), remeasure=remeasure,
                              baseline=baseline, bench=not no_bench)
    return _run(req, f"edgecomp release {build_file}", as_json)


def _run(req: Any, title: str, as_json: bool) -> int:
    """Build, print the summary (or the JSON report), and turn a missed budget or a regression into exit 1."""
    from edgecomp.pipeline import build as run_build
    from edgecomp.release import failures

    if as_json:
        report = run_build(req)
        _echo_json(report)
    else:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            with console.status("building") as status:
                report = run_build(req, progress=lambda s: status.update(s))
        else:  # a log gets no spinner (which would leave a stray blank line on stderr)
            report = run_build(req)
        from edgecomp.report import SUMMARY_HEADER, summary_rows

        _table(title, SUMMARY_HEADER, summary_rows(report))
        if report["data"]["synthetic"]:
            click.echo(f"warning: {report['data']['note']}", err=True)
        stages = report["cache"]["stages"]
        if report["cache"]["root"]:
            click.echo(f"cache: {sum(v == 'hit' for v in stages.values())} of {len(stages)} stages reused ({report['cache']['root']})")
        if report.get("gate"):
            g = report["gate"]
            click.echo(f"gate: {'PASS' if g['ok'] else 'FAIL'}, {len(g['checks'])} checks against {g['baseline']}")
        click.echo(f"report: {req.out / 'report.md'} (and report.json, report.html, manifest.json)")
    if not report["ok"]:
        click.echo("edgecomp: build over budget or regressed: " + "; ".join(failures(report)), err=True)
        return 1
    return 0


@cli.command(epilog="Example: edgecomp targets --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets(as_json: bool) -> int:
    """List target profiles and whether each runtime is usable on this machine (and why not)."""
    from edgecomp.backends import availability
    from edgecomp.profile import load_profile, profile_names

    rows = []
    for name in profile_names():
        p = load_profile(name)
        ok, why = availability(p.backend)
        rows.append({"target": name, "backend": p.backend, "precision": p.precision, "threads": p.threads,
                     "available": ok, "reason": why, "budget": p.budget, "description": p.description})
    if as_json:
        _echo_json(rows)
    else:
        _table("targets", ["target", "backend", "precision", "available", "budget"],
               [[r["target"], r["backend"], r["precision"], "yes" if r["available"] else f"no: {r['reason']}",
                 ", ".join(f"{k} {v:g}" for k, v in r["budget"].items())] for r in rows])
    return 0


@cli.command(epilog="Example: edgecomp passes --json")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def passes(as_json: bool) -> int:
    """List compression passes, where they run (torch or graph), and their options."""
    import dataclasses

    from edgecomp.passes import PASSES, pass_module

    rows = []
    for name, info in PASSES.items():
        params = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(pass_module(name).Params)}
        rows.append({"pass": name, "level": info.level, "requires": list(info.requires), "summary": info.summary, "options": params})
    if as_json:
        _echo_json(rows)
    else:
        _table("passes", ["pass", "level", "summary", "options (defaults)"],
               [[r["pass"], r["level"], r["summary"], ", ".join(f"{k}={v}" for k, v in r["options"].items())] for r in rows])
    return 0


@cli.command(epilog="Example: edgecomp inspect model.onnx --json")
@click.argument("model")
@_input_option
@click.option("--trust-remote-code", is_flag=True, help="Allow unpickling a full model file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model: str, inputs: tuple[str, ...], trust_remote_code: bool, as_json: bool) -> int:
    """Show MODEL's I/O signature, op histogram, parameter count and size (exporting it if needed)."""
    from edgecomp.inspect import inspect_model
    from edgecomp.load import parse_input_specs

    info = inspect_model(model, parse_input_specs(inputs), trust_remote_code)
    if as_json:
        _echo_json(info)
        return 0
    click.echo(f"{info['name']}  ({info['format']}, opset {info['opset']}, {info['parameters']:,} parameters, "
               f"{info['size_bytes'] / 2**20:.2f} MB)")
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            click.echo(f"  {kind[:-1]:6} {t['name']}: {t['dtype']} {t['shape']}")
    _table("ops", ["op", "count"], [[k, str(v)] for k, v in info["ops"].items()])
    return 0


@cli.command(epilog="Example: edgecomp validate build/minilm/ort-int8")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(1, 256), help="Threads (default: the manifest's).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(artifact: Path, threads: int | None, as_json: bool) -> int:
    """Re-check a built ARTIFACT folder against its reference.npz and its manifest's budget."""
    from edgecomp.artifact import validate_artifact

    result = validate_artifact(artifact, threads)
    if as_json:
        _echo_json(result)
    else:
        for c in result["verdict"]["checks"]:
            click.echo(f"  {c['metric']:16} {c['value']:.6g} {c['op']} {c['limit']:g}  {'ok' if c['ok'] else 'FAIL'}")
        click.echo(f"{artifact}: {'PASS' if result['verdict']['ok'] else 'FAIL'} on {result['parity']['samples']} reference samples")
    return 0 if result["verdict"]["ok"] else 1


@cli.command(epilog="Example: edgecomp bench build/minilm/ort-int8 build/minilm/ort-fp32 --runs 200")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threads", type=click.IntRange(1, 256), help="Threads (default: the manifest's).")
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(0), default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(artifacts: tuple[Path, ...], threads: int | None, warmup: int, runs: int, min_seconds: float, as_json: bool) -> int:
    """Measure latency of one or more ARTIFACT folders in one run, interleaved; ratios are to the first."""
    from edgecomp.artifact import bench_artifacts

    results = bench_artifacts(list(artifacts), threads, warmup, runs, min_seconds)
    base = results[0]["latency"]["p50_ms"]
    for r in results:
        r["latency"]["ratio_to_first"] = r["latency"]["p50_ms"] / base
    if as_json:
        _echo_json(results)
    else:
        _table("latency", ["artifact", "runtime", "threads", "p50", "p90", "p99", "load", "vs first"],
               [[str(r["artifact"]), f"{r['runtime']['runtime']} {r['runtime']['version']}", str(r["runtime"]["threads"]),
                 f"{r['latency']['p50_ms']:.2f} ms", f"{r['latency']['p90_ms']:.2f} ms", f"{r['latency']['p99_ms']:.2f} ms",
                 f"{r['load']['load_s']:.2f} s", f"{r['latency']['ratio_to_first']:.2f}x"] for r in results])
    return 0


@cli.command(epilog="Example: edgecomp diff build/minilm/ort-fp32 build/minilm/ort-int8 --top 10")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--samples", type=click.Path(path_type=Path), help="Input to compare on (.npz); default: A's reference.npz.")
@click.option("--jump-db", type=float, default=6.0, show_default=True, help="SQNR drop (dB) that marks where error enters.")
@click.option("--top", type=int, default=15, show_default=True, help="Rows to print: the worst tensors by SQNR.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every matched tensor).")
def diff(a: Path, b: Path, samples: Path | None, jump_db: float, top: int, as_json: bool) -> int:
    """Compare two models (ONNX files, ONNX Runtime or OpenVINO artifacts) tensor by tensor on one real input."""
    from edgecomp.diff import diff as run_diff, first_feed

    result = run_diff(a, b, first_feed(a, samples), jump_db=jump_db)
    if as_json:
        _echo_json(result)
        return 0
    worst = sorted(result["tensors"], key=lambda r: r["sqnr_db"])[:top]
    _table(f"{result['matched']} matched tensors, worst {len(worst)} by SQNR", ["tensor", "shape", "cosine", "max abs", "SQNR dB"],
           [[r["tensor"], "x".join(map(str, r["shape"])), f"{r['cosine']:.5f}", f"{r['max_abs']:.3g}", f"{r['sqnr_db']:.1f}"]
            for r in worst])
    click.echo(f"error first jumps at: {result['first_jump'] or 'nowhere (no drop above the threshold)'}")
    if len(result["jumps"]) > 1:
        click.echo(f"further jumps: {', '.join(result['jumps'][1:6])}{' ...' if len(result['jumps']) > 6 else ''}")
    return 0


def _forget_interrupt() -> None:
    """CPython (3.11, 3.12) quirk: a KeyboardInterrupt that passed through `exec` of a string (scipy does
    that while importing) sets a flag that makes the interpreter kill itself with SIGINT at exit, so the
    exit status is -2 whatever `sys.exit` says. Executing any string resets the flag; exit 2 stands."""
    exec("pass")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps every failure to one stderr line and an exit code."""
    from edgecomp.output import on_signal

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    quiet_libraries()
    try:
        code = cli.main(args=argv, prog_name="edgecomp", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:
        click.echo(f"edgecomp: error: {e.format_message()}", err=True)
        code = 2
    except (KeyboardInterrupt, click.exceptions.Abort):
        click.echo("edgecomp: interrupted; nothing was written", err=True)
        code = 2
        _forget_interrupt()
    except EdgecompError as e:
        if _DEBUG:
            raise
        click.echo(f"edgecomp: error: {e}", err=True)
        code = e.exit_code
    except Exception as e:  # a bug or an unforeseen runtime failure: still one line
        if _DEBUG:
            raise
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        click.echo(f"edgecomp: error: {type(e).__name__}: {msg} (re-run with --debug for details)", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
