"""Knowledge distillation: the input model teaches a smaller student built from it.

Student (from the teacher, DistilBERT-style): keep `layers` (teacher indices), or `num_layers`
spread evenly (first and last kept), or every `keep_every`-th; optionally narrower by removing
`heads_ratio` of each layer's heads, `ffn_ratio` of its FFN neurons, `channels_ratio` of conv
channels (by weight magnitude, with prune-structured's code); or a freshly initialised encoder
from `student_config` (a JSON file of config overrides, e.g. {"hidden_size": 192}), where learned
projections map its hidden states to the teacher's width.

Loss (see `_train_distill` for the formulas): kd (soft targets at temperature T, weight alpha,
scaled by T^2; hard labels when the recipe has them) for classifiers; embed_cos / embed_mse on the
output embedding for encoders; relation (pairwise cosine matrices of a batch); hidden-state MSE
over `layer_map`; attention-map KL. Terms a model cannot have are dropped and the record says
which ran. Data: the recipe's train split. Training: `_train.train` (AdamW, warm-up + linear
decay, seeded, checkpoint each epoch, `resume`, DDP under torchrun).

Run under torchrun with the same code the build uses:
    torchrun --nproc_per_node 2 -m edgecomp.passes.distill digits --out build/distill-digits --set epochs=2
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecomp.errors import UsageError
from edgecomp.model import ModelHandle
from edgecomp.passes._torch_util import Clock, check_training, clone, downsample, find_transformer, plot_curve, record, stats, torch_module
from edgecomp.passes._train import TrainConfig
from edgecomp.passes._train_distill import Weights
from edgecomp.passes.context import PassContext


@dataclass(frozen=True)
class Params:
    # the student
    layers: tuple[int, ...] = ()
    num_layers: int = 0
    keep_every: int = 2
    heads_ratio: float = 0.0
    ffn_ratio: float = 0.0
    channels_ratio: float = 0.0
    student_config: str = ""
    layer_map: tuple[int, ...] = ()
    absorb_ffn: int = 0  # a wider student: each dropped layer's N strongest FFN neurons join the kept layer before it
    # the loss (weights; 0 turns a term off)
    kd: float = 1.0
    alpha: float = 0.5
    temperature: float = 2.0
    embed_cos: float = 1.0
    embed_mse: float = 0.0
    relation: float = 1.0
    hidden: float = 1.0
    attention: float = 0.0
    # training
    epochs: int = 3
    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    seed: int = -1  # -1: the build's seed
    threads: int = 0  # torch threads while training (0: unchanged); torchrun runs one thread per rank
    dropout: float = 0.0  # the student's dropout while it trains (-1: the model's own)
    teacher_forcing: float = 0.0  # start probability that a student layer gets the teacher's hidden state as input
    forcing_until: float = 0.5  # ... falling linearly to 0 at this share of the run
    augment: float = 0.0  # share of token samples rewritten per batch (replace / delete / splice) for the teacher to label
    train_embeddings: bool = False
    precision: str = "fp32"  # fp32 | bf16 | auto: bf16 autocast (fp32 weights, loss and teacher) where the CPU has it natively
    checkpoint_dir: str = ""  # "": the build's scratch folder (deleted with it); a path keeps them
    keep_checkpoints: bool = False
    resume: str = ""

    def __post_init__(self) -> None:
        for name in ("heads_ratio", "ffn_ratio", "channels_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)} must be in [0, 1)")
        if self.keep_every < 1 or self.num_layers < 0 or self.absorb_ffn < 0:
            raise ValueError("keep_every must be >= 1, num_layers and absorb_ffn >= 0")
        if self.epochs < 1 and self.steps < 1:
            raise ValueError("give epochs >= 1 or steps >= 1")
        if self.temperature <= 0 or not 0 <= self.alpha <= 1:
            raise ValueError("temperature must be > 0 and alpha in [0, 1]")
        check_training(self.batch_size, self.lr, self.augment, self.dropout, self.precision)


def run(model: ModelHandle, params: Params, ctx: PassContext) -> ModelHandle:
    clock = Clock()
    teacher = torch_module(model, "distill")
    before = stats(teacher)
    seed = params.seed if params.seed >= 0 else ctx.seed
    student, built = make_student(teacher, params, seed)
    summary = distill_student(teacher, student, model, ctx, weights=weights_for(params, ctx),
                              cfg=train_config(params, ctx, "distill"), layer_map=list(params.layer_map) or None,
                              train_embeddings=params.train_embeddings, label="distill", threads=params.threads,
                              dropout=params.dropout, augment=params.augment,
                              forcing=(params.teacher_forcing, params.forcing_until))
    rec = record("distill", params, before, stats(student), clock, student=built, training=summary)
    return model.with_pass(rec, onnx_path=None, torch_module=student.eval())


def train_config(p: Any, ctx: PassContext, scratch: str) -> TrainConfig:
    """TrainConfig from a pass's options (epochs, steps, batch_size, lr, seed, checkpoint_dir, resume ...)."""
    seed = getattr(p, "seed", -1)
    folder = Path(p.checkpoint_dir) if getattr(p, "checkpoint_dir", "") else ctx.scratch(scratch) / "checkpoints"
    return TrainConfig(epochs=p.epochs, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                       weight_decay=getattr(p, "weight_decay", 0.01), warmup=getattr(p, "warmup", 0.06),
                       seed=seed if seed >= 0 else ctx.seed, checkpoint_dir=folder,
                       resume=Path(p.resume) if getattr(p, "resume", "") else None,
                       keep_checkpoints=getattr(p, "keep_checkpoints", False),
                       precision=getattr(p, "precision", "fp32"))


def weights_for(p: Any, ctx: PassContext) -> Weights:
    """The loss weights, with terms the task cannot have switched off (kd needs logits, embed_* an embedding)."""
    from edgecomp.passes._train_data import is_classifier

    cls = is_classifier(ctx)
    get = lambda k, d: float(getattr(p, k, d))  # noqa: E731
    return Weights(kd=get("kd", 1.0) if cls else 0.0, embed_cos=0.0 if cls else get("embed_cos", 1.0),
                   embed_mse=0.0 if cls else get("embed_mse", 0.0), relation=get("relation", 1.0),
                   hidden=get("hidden", 1.0), attention=get("attention", 0.0),
                   alpha=get("alpha", 0.5), temperature=get("temperature", 2.0))


def recover(teacher: Any, student: Any, model: ModelHandle, ctx: PassContext, p: Any, label: str, *,
            epochs: int | None = None, steps: int | None = None, scratch: str | None = None,
            after_step: Any = None) -> dict[str, Any]:
    """A recovery fine-tune of a compressed `student` by distillation from the uncompressed `teacher`,
    with the default loss for the task; `p` gives batch_size, lr, seed, checkpoint_dir (and resume)."""
    from types import SimpleNamespace

    q = SimpleNamespace(epochs=max(1, p.recover_epochs if epochs is None else epochs),
                        steps=p.recover_steps if steps is None else steps, batch_size=p.batch_size, lr=p.lr,
                        seed=p.seed, checkpoint_dir=getattr(p, "checkpoint_dir", ""), resume=getattr(p, "resume", ""),
                        precision=getattr(p, "precision", "fp32"))
    if scratch and q.checkpoint_dir:
        q.checkpoint_dir = str(Path(q.checkpoint_dir) / scratch)
    return distill_student(teacher, student, model, ctx, weights=weights_for(p, ctx),
                           cfg=train_config(q, ctx, f"{label}/{scratch or 'recovery'}"), after_step=after_step, label=label,
                           augment=float(getattr(p, "augment", 0.0)), dropout=float(getattr(p, "dropout", 0.0)))


def distill_student(teacher: Any, student: Any, model: ModelHandle, ctx: PassContext, *, weights: Weights,
                    cfg: TrainConfig, layer_map: list[int] | None = None, train_embeddings: bool = False,
                    after_step: Any = None, label: str = "distill", threads: int = 0,
                    dropout: float = 0.0, augment: float = 0.0,
                    forcing: tuple[float, float] = (0.0, 0.5)) -> dict[str, Any]:
    """Train `student` (in place) to imitate `teacher` on the recipe's train split; the training summary.

    Used by this pass and by the recovery fine-tunes of prune-structured, prune-unstructured, share.
    """
    import torch

    from edgecomp.passes._train import train
    from edgecomp.passes._train_data import training_data, word_vocab
    from edgecomp.passes._train_distill import make_distiller

    data, origin = training_data(model, ctx)
    data["_idx"] = torch.arange(len(next(iter(data.values()))))  # the key of the distiller's teacher cache
    lengths = data["attention_mask"].sum(1) if "attention_mask" in data else None
    try:
        distiller = make_distiller(student, teacher, model.input_names, weights, layer_map, augment,
                                   word_vocab(ctx) if augment > 0 else None, *forcing)
    except ValueError as e:
        raise UsageError(f"{label}: {e}") from None
    tr = find_transformer(student)
    frozen = [p for p in tr.embeddings.parameters() if p.requires_grad] if tr is not None and not train_embeddings else []
    for p in frozen:
        p.requires_grad_(False)  # the corpus is small: unseen words keep the teacher's embeddings
    threads_before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    drops = {m: m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)} if dropout >= 0 else {}
    for m in drops:
        m.p = dropout  # a short distillation on a small corpus learns faster without it
    try:
        res = train(distiller, data, cfg, after_step=after_step, lengths=lengths, progress=getattr(ctx, "progress", None),
                    label=label)
    finally:
        torch.set_num_threads(threads_before)
        for m, p in drops.items():
            m.p = p
        distiller.close()
        for p in frozen:
            p.requires_grad_(True)
    kept = not _inside(cfg.checkpoint_dir, ctx.workdir)  # the build's scratch folder goes with it: name only a kept one
    plot = plot_curve(res.losses, Path(cfg.checkpoint_dir) / "loss.png", label) if kept and get_rank0() else None
    return {"data": origin, "samples": len(data["_idx"]), "terms": distiller.terms(),
            "weights": {k: v for k, v in dataclasses.asdict(weights).items() if v},
            "layer_map": distiller.layer_map, "projections": len(distiller.proj),
            "steps": res.steps, "start_step": res.start_step, "epochs": res.epochs_done, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "seed": cfg.seed, "world_size": res.world_size, "precision": res.precision,
            "threads": torch.get_num_threads() if threads <= 0 else threads,
            "dropout": dropout if dropout >= 0 else "model", "augment": augment,
            "teacher_forcing": list(forcing) if forcing[0] > 0 else None,
            "train_seconds": res.seconds, "train_cpu_seconds": res.cpu_seconds,
            "loss_first": round(res.losses[0], 6) if res.losses else None,
            "loss_last": round(res.losses[-1], 6) if res.losses else None,
            "loss_terms_last_epoch": res.parts, "loss_curve": downsample(res.losses),
            "loss_curve_steps_per_point": max(1, -(-len(res.losses) // 200)),
            "checkpoints": sorted(set(res.checkpoints)) if kept else [], "loss_plot": plot}


def get_rank0() -> bool:
    from edgecomp.passes._train import world

    return world()[0] == 0


def _inside(path: Path | None, folder: Path) -> bool:
    return path is None or Path(folder).resolve() in Path(path).resolve().parents


def make_student(teacher: Any, p: Params, seed: int) -> tuple[Any, dict[str, Any]]:
    """A student built from the teacher (never modifying it) and a description of what was removed."""
    import torch

    student = clone(teacher)
    built: dict[str, Any] = {}
    tr = find_transformer(student)
    if p.student_config:
        if tr is None:
            raise UsageError("distill: student_config needs a transformer encoder (BERT-like) teacher")
        torch.manual_seed(seed)
        return fresh_student(student, tr, p.student_config)
    if tr is not None:
        n = len(tr.encoder.layer)
        keep = list(p.layers) or evenly(n, p.num_layers or -(-n // p.keep_every))
        if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
            raise UsageError(f"distill: layers {keep} must be distinct teacher layers in [0, {n})")
        donors = {i: tr.encoder.layer[i] for i in range(n) if i not in keep}
        drop_layers(tr, sorted(keep))
        built |= {"kind": "layers", "teacher_layers": n, "kept_layers": sorted(keep),
                  "removed_layers": [i for i in range(n) if i not in keep]}
        if p.absorb_ffn:
            built["absorbed_ffn"] = absorb_ffn(tr, sorted(keep), donors, p.absorb_ffn)
    if p.heads_ratio or p.ffn_ratio or p.channels_ratio:
        from edgecomp.passes.prune_structured import shrink

        built["width"] = shrink(student, heads=p.heads_ratio, neurons=p.ffn_ratio, channels=p.channels_ratio)
    if not built:
        raise UsageError("distill: nothing makes the student smaller: the model has no transformer layers to drop; "
                         "give channels_ratio (conv channels) or heads_ratio / ffn_ratio")
    return student, built


def absorb_ffn(tr: Any, keep: list[int], donors: dict[int, Any], k: int) -> dict[str, Any]:
    """Widen the student's FFNs with the dropped layers' own neurons: each dropped teacher layer's k strongest
    (||W1_j|| * ||W2[:, j]||) join the FFN of the kept layer before it (the first kept layer takes those
    dropped before it). An FFN adds its output to the residual stream, so they start as the dropped layer's
    detectors fed by the kept layer's input, and distillation adapts them. The gain is the width, at its
    cost in speed: swapping the same neurons in for the kept layer's weakest (width unchanged) measured
    nothing (MiniLM 6 -> 3 layers, 1000 steps: tools/distill_minilm.py)."""
    import torch

    out: dict[str, Any] = {}
    for new, old in enumerate(keep):
        given = [d for d in sorted(donors) if max([i for i in keep if i < d], default=keep[0]) == old]
        if not given:
            continue
        layer = tr.encoder.layer[new]
        a, o = layer.intermediate.dense, layer.output.dense
        parts = [(a.weight, a.bias, o.weight)]
        for d in given:
            da, do = donors[d].intermediate.dense, donors[d].output.dense
            top = torch.argsort(da.weight.detach().norm(dim=1) * do.weight.detach().norm(dim=0), descending=True)[:k]
            parts.append((da.weight[top], da.bias[top], do.weight[:, top]))
        width = sum(w1.shape[0] for w1, _, _ in parts)
        na = torch.nn.Linear(a.in_features, width, dtype=a.weight.dtype)
        no = torch.nn.Linear(width, o.out_features, dtype=o.weight.dtype)
        with torch.no_grad():
            na.weight.copy_(torch.cat([w1 for w1, _, _ in parts]))
            na.bias.copy_(torch.cat([b1 for _, b1, _ in parts]))
            no.weight.copy_(torch.cat([w2 for _, _, w2 in parts], 1))
            no.bias.copy_(o.bias)
        layer.intermediate.dense, layer.output.dense = na, no
        out[str(new)] = {"from_teacher_layers": given, "neurons_added": width - a.out_features, "width": width}
    return out


def evenly(n: int, k: int) -> list[int]:
    """k of n layer indices spread evenly, first and last included: 6 -> 3 gives [0, 2, 5]."""
    import numpy as np

    k = max(1, min(n, k))
    return sorted({int(i) for i in np.round(np.linspace(0, n - 1, k))}) if k > 1 else [n - 1]


def drop_layers(tr: Any, keep: list[int]) -> None:
    """Keep only `keep` of the encoder's layers (in place), with the config and pruned-head map updated."""
    import torch

    old = tr.encoder.layer
    tr.encoder.layer = torch.nn.ModuleList([old[i] for i in keep])
    tr.config.num_hidden_layers = len(keep)
    pruned = getattr(tr.config, "pruned_heads", None) or {}
    tr.config.pruned_heads = {new: pruned[old_i] for new, old_i in enumerate(keep) if old_i in pruned}
    for new, layer in enumerate(tr.encoder.layer):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new


def fresh_student(root: Any, tr: Any, config_file: str) -> tuple[Any, dict[str, Any]]:
    """Replace the encoder inside `root` by a new, randomly initialised one with the given config overrides."""
    path = Path(config_file)
    try:
        overrides = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"distill: student_config {config_file}: not a readable JSON file ({e})") from None
    cfg = tr.config.__class__.from_dict({**tr.config.to_dict(), **overrides, "pruned_heads": {}})
    cfg._attn_implementation = "eager"  # attention maps are read from the eager path
    new = type(tr)(cfg)
    if root is tr:
        root = new
    else:
        name = next(n for n, m in root.named_modules() if m is tr)
        parent = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
        setattr(parent, name.rpartition(".")[2], new)
    built = {"kind": "config", "overrides": overrides, "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
             "initialisation": "random"}
    if cfg.hidden_size != tr.config.hidden_size:
        built["note"] = (f"hidden size {cfg.hidden_size} != the teacher's {tr.config.hidden_size}: an output taken from "
                         "hidden states (e.g. a pooled embedding) changes width")
    return root, built


def main(argv: list[str] | None = None) -> int:
    """`[torchrun --nproc_per_node N] python -m edgecomp.passes.distill MODEL --out DIR [--set k=v ...]`.

    MODEL is a recipe name (its train split is the data) or `module:function` returning an nn.Module
    (then --data FILE.npz gives the training inputs, one array per input name, optional `labels`).
    Rank 0 writes DIR/student.pt (the state dict) and DIR/record.json; --every-rank makes each rank
    write DIR/student.rank<R>.pt (to check that the ranks agree).
    """
    import argparse
    import importlib
    import sys

    from edgecomp.cli import quiet_libraries

    quiet_libraries()  # before transformers is imported: without USE_TF=0 it loads TensorFlow in every rank
    import torch

    from edgecomp.data import SampleSet
    from edgecomp.model import TensorSpec
    from edgecomp.passes import make_params, parse_pass_spec
    from edgecomp.passes._train import init_distributed

    ap = argparse.ArgumentParser(prog="python -m edgecomp.passes.distill", description=main.__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every-rank", action="store_true")
    args = ap.parse_args(argv)
    rank, size = init_distributed()
    _, options = parse_pass_spec("distill:" + ",".join(args.options))
    options.setdefault("checkpoint_dir", str(args.out / "checkpoints"))
    params = make_params("distill", options)
    args.out.mkdir(parents=True, exist_ok=True)
    if ":" in args.model:
        mod, _, fn = args.model.partition(":")
        module = getattr(importlib.import_module(mod), fn)()
        if args.data is None:
            raise UsageError("a module:function model needs --data FILE.npz")
        recipe = _NpzData(args.data)
        inputs = tuple(TensorSpec(k, str(v.dtype), ("batch", *v.shape[1:])) for k, v in recipe.arrays.items() if k != "labels")
        feeds = [{t.name: recipe.arrays[t.name][:1] for t in inputs}]
        handle = ModelHandle(args.model, inputs, (TensorSpec("output", "float32", ("batch",)),), {"factory": args.model},
                             torch_module=module)
        ctx = PassContext(args.out / "work", SampleSet(feeds, feeds, None, f"npz:{args.data}"), args.seed, recipe)
    else:
        from edgecomp.load.recipe import load_from_recipe
        from edgecomp.recipe import load_recipe

        recipe = load_recipe(args.model)
        handle = load_from_recipe(recipe)
        ctx = PassContext(args.out / "work", recipe.module().samples(recipe), args.seed, recipe)
    torch.manual_seed(args.seed)
    if rank == 0 and not sys.stderr.isatty():  # a log, not a terminal: a status line every 30 s
        ctx.progress = _every(30.0, lambda m: print(m, file=sys.stderr, flush=True))
    out = run(handle, params, ctx)
    state = out.torch_module.state_dict()
    if args.every_rank:
        torch.save(state, args.out / f"student.rank{rank}.pt")
    if rank == 0:
        torch.save(state, args.out / "student.pt")
        (args.out / "record.json").write_text(json.dumps(out.history[-1], indent=2) + "\n")
    if size > 1:
        torch.distributed.destroy_process_group()
    return 0


def _every(seconds: float, say: Any) -> Any:
    import time

    last = [0.0]

    def progress(message: str) -> None:
        if time.monotonic() - last[0] >= seconds:
            last[0] = time.monotonic()
            say(message)
    return progress


@dataclass
class _NpzData:
    """Stands in for a recipe when the entry point trains on an .npz: its arrays are the train split."""

    path: Path

    def __post_init__(self) -> None:
        import numpy as np

        with np.load(self.path, allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.name, self.builder = self.path.stem, "npz"
        self.task = "classification" if "labels" in self.arrays else "embedding"

    def module(self) -> Any:
        return self

    def train_data(self, recipe: Any) -> dict[str, Any]:
        return self.arrays


if __name__ == "__main__":
    raise SystemExit(main())
