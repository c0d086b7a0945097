"""Compression passes (distill, prune-structured, prune-unstructured, lowrank, share) on tiny real models:
a 4-layer BERT encoder built here (hidden 32, 4 heads, FFN 64, mean-pooled like the MiniLM recipe) and
the digits recipe's CNN. Every assertion is a number the pass must really produce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgecomp.data import SampleSet  # noqa: E402
from edgecomp.errors import UsageError  # noqa: E402
from edgecomp.model import ModelHandle, TensorSpec  # noqa: E402
from edgecomp.passes import PASSES, make_params, pass_module  # noqa: E402
from edgecomp.passes.context import PassContext  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ, VOCAB, HIDDEN, LAYERS, HEADS, FFN = 16, 100, 32, 4, 4, 64
# one BertLayer: q, k, v, o (H*H + H each), two LayerNorms (2H each), FFN in (H*F + F) and out (F*H + H)
LAYER_PARAMS = 4 * (HIDDEN * HIDDEN + HIDDEN) + 2 * 2 * HIDDEN + (HIDDEN * FFN + FFN) + (FFN * HIDDEN + HIDDEN)
COMPRESS = ("distill", "prune-structured", "prune-unstructured", "lowrank", "share")


def tiny_encoder() -> torch.nn.Module:
    """A real (randomly initialised, seeded) BertModel + masked mean pooling, like the MiniLM recipe's."""
    from transformers import BertConfig, BertModel

    class TinyEncoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                     vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager")
    return TinyEncoder(BertModel(cfg)).eval()


def token_arrays(n: int, seed: int) -> dict[str, np.ndarray]:
    """n right-padded sequences of 3..SEQ real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, SEQ), np.int64)
    for i in range(n):
        length = rng.integers(3, SEQ + 1)
        ids[i, :length] = rng.integers(1, VOCAB, length)
    return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}


def _feeds(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared CPU makes two threads slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def bert(tmp_path: Path) -> tuple[ModelHandle, PassContext]:
    specs = tuple(TensorSpec(n, "int64", ("batch", "seq")) for n in ("input_ids", "attention_mask", "token_type_ids"))
    handle = ModelHandle("tiny-bert", specs, (TensorSpec("embedding", "float32", ("batch", HIDDEN)),), {"test": True},
                         torch_module=tiny_encoder())
    samples = SampleSet(_feeds(token_arrays(64, 1)), _feeds(token_arrays(16, 2)), None, "test")
    return handle, PassContext(tmp_path / "work", samples, 0)


@pytest.fixture(scope="module")
def digits_recipe():
    from edgecomp.recipe import load_recipe

    return load_recipe("digits")


@pytest.fixture()
def digits(digits_recipe, tmp_path: Path) -> tuple[ModelHandle, PassContext]:
    from edgecomp.load.recipe import load_from_recipe

    return load_from_recipe(digits_recipe), PassContext(tmp_path / "work", digits_recipe.module().samples(digits_recipe), 0,
                                                        digits_recipe)


def run_pass(name: str, handle: ModelHandle, ctx: PassContext, **options) -> ModelHandle:
    out = pass_module(name).run(handle, make_params(name, options), ctx)
    json.dumps(out.history[-1])  # records go into report.json as they are
    assert out.onnx_path is None and out.history[-1]["pass"] == name
    return out


def embed(module: torch.nn.Module, feeds: list[dict[str, np.ndarray]]) -> torch.Tensor:
    arrays = {k: torch.from_numpy(np.concatenate([f[k] for f in feeds])) for k in feeds[0]}
    with torch.no_grad():
        return module(*arrays.values())


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_registry_lists_every_compression_pass():
    for name in COMPRESS:
        info = PASSES[name]
        assert info.level == "torch"
        make_params(name, {})  # defaults are valid


@pytest.mark.parametrize("name", COMPRESS)
@pytest.mark.parametrize("bad", [{"precision": "fp16"}, {"dropout": 1.0}, {"augment": 2.0}, {"batch_size": 0}])
def test_training_options_are_checked_when_the_pass_is_parsed(name, bad):
    """A bad fine-tune option is a usage error before any pass runs, not after the pruning it follows."""
    with pytest.raises(UsageError, match=next(iter(bad))):
        make_params(name, bad)


def test_distill_drops_layers_and_learns(bert):
    handle, ctx = bert
    before = state(handle.torch_module)
    out = run_pass("distill", handle, ctx, num_layers=2, epochs=6, batch_size=16, lr=1e-3, attention=1.0)
    rec = out.history[-1]
    assert rec["student"]["kept_layers"] == [0, 3] and rec["student"]["removed_layers"] == [1, 2]
    assert rec["params_before"] - rec["params_after"] == 2 * LAYER_PARAMS
    assert len(out.torch_module.bert.encoder.layer) == 2 and out.torch_module.bert.config.num_hidden_layers == 2
    tr = rec["training"]
    assert tr["terms"] == ["hidden", "attention", "relation", "embed_cos"] and tr["layer_map"] == [1, 3]
    assert tr["steps"] == 24 and len(tr["loss_curve"]) == 24
    assert np.mean(tr["loss_curve"][-4:]) < 0.8 * np.mean(tr["loss_curve"][:4])
    after = state(handle.torch_module)  # the teacher (the input handle's module) is untouched
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert embed(out.torch_module, ctx.samples.validation).shape == (16, HIDDEN)


def test_distill_absorb_ffn_widens_with_the_dropped_layers_strongest_neurons():
    """4 -> 2 layers keeps [0, 3]: dropped layers 1 and 2 give their 8 strongest FFN neurons (W1 rows, biases,
    W2 columns, exactly) to kept layer 0, which keeps all its own; the teacher is untouched."""
    from edgecomp.passes.distill import make_student

    teacher = tiny_encoder()
    before = state(teacher)
    student, built = make_student(teacher, make_params("distill", {"num_layers": 2, "absorb_ffn": 8}), 0)
    assert built["absorbed_ffn"] == {"0": {"from_teacher_layers": [1, 2], "neurons_added": 16, "width": FFN + 16}}
    layer, last = student.bert.encoder.layer
    assert last.intermediate.dense.out_features == FFN  # nothing was dropped after layer 3
    own = teacher.bert.encoder.layer[0]
    assert torch.equal(layer.intermediate.dense.weight[:FFN], own.intermediate.dense.weight)
    assert torch.equal(layer.output.dense.weight[:, :FFN], own.output.dense.weight)
    w1 = layer.intermediate.dense.weight
    for d in (1, 2):
        src = teacher.bert.encoder.layer[d]
        strength = src.intermediate.dense.weight.norm(dim=1) * src.output.dense.weight.norm(dim=0)
        for j in torch.argsort(strength, descending=True)[:8].tolist():
            row = (w1 == src.intermediate.dense.weight[j]).all(1).nonzero().flatten().tolist()
            assert len(row) == 1 and row[0] >= FFN
            assert torch.equal(layer.output.dense.weight[:, row[0]], src.output.dense.weight[:, j])
            assert layer.intermediate.dense.bias[row[0]] == src.intermediate.dense.bias[j]
    assert student(*[torch.from_numpy(v) for v in token_arrays(2, seed=1).values()]).shape == (2, HIDDEN)
    after = state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distill_teacher_cache_matches_the_teacher_on_mixed_batches():
    """Rows cached in an earlier step and rows the teacher has not seen (augmented: _idx -1) share a batch:
    the targets equal one teacher forward on the whole batch, on every real position, as the cache keeps
    them (fp16 states, so a target never depends on whether it was cached)."""
    from edgecomp.passes._train_distill import Weights, make_distiller

    teacher = tiny_encoder()
    student = tiny_encoder()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    d = make_distiller(student, teacher, names, Weights(hidden=1.0, attention=1.0, embed_cos=1.0))
    data = {k: torch.from_numpy(v) for k, v in token_arrays(8, seed=3).items()}
    first = dict(data, _idx=torch.arange(8))
    d.teach(first, [first[n] for n in names], first["attention_mask"])
    assert sorted(d.cache) == list(range(8)) and d.cache_bytes > 0
    assert {h.dtype for h in d.cache[0][1] if h is not None} == {torch.float16}
    mixed = {k: v[[5, 0, 2, 7]] for k, v in data.items()} | {"_idx": torch.tensor([5, -1, 2, -1])}
    got_out, got_hid, got_att = d.teach(mixed, [mixed[n] for n in names], mixed["attention_mask"])
    assert {h.dtype for h in got_hid if h is not None} == {torch.float16}
    got_hid = [None if h is None else h.float() for h in got_hid]
    got_att = [None if a is None else a.float() for a in got_att]
    want_out, want_hid, want_att = d.run_teacher([mixed[n] for n in names])
    fp32_hid = want_hid
    want_hid = [None if h is None else h.half().float() for h in want_hid]
    want_att = [None if a is None else a.half().float() for a in want_att]
    real = mixed["attention_mask"].bool()
    torch.testing.assert_close(got_out, want_out, atol=1e-6, rtol=0)
    assert sum(h is not None for h in got_hid) == LAYERS + 1 and sum(a is not None for a in got_att) == LAYERS
    for g, w in zip(got_hid, want_hid):
        if w is not None:
            torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=0)
            assert float(g[~real].abs().max()) == 0.0  # cached rows are stored to their real length
    for g, w in zip(got_att, want_att):
        if w is not None:
            keys = real[:, None, None, :].expand_as(w) & real[:, None, :, None].expand_as(w)
            torch.testing.assert_close(g[keys], w[keys], atol=1e-6, rtol=0)
    assert sorted(d.cache) == list(range(8))  # augmented rows are never cached
    err = max(float((g[real] - w[real]).abs().max() / w[real].abs().max()) for g, w in zip(got_hid, fp32_hid) if w is not None)
    assert 0 < err < 1e-3  # the rounding is real and small
    d.close()


def test_each_rank_owns_a_fixed_shard_in_a_new_order_every_epoch():
    """Ranks split the samples once (so each rank's teacher cache covers its shard after one epoch), all
    take the same number of steps, and one process keeps DistributedSampler's order (runs unchanged)."""
    from torch.utils.data import DistributedSampler

    from edgecomp.passes._train import _epoch_order, _shard

    n = 11
    shards = [_shard(n, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [6, 6] and set(shards[0]) | set(shards[1]) == set(range(n))
    assert not set(shards[0]) & set(shards[1][:5])  # only the padding repeats a sample
    for r in range(2):
        orders = [_epoch_order(shards[r], 7 + e) for e in range(3)]
        assert all(sorted(o) == sorted(shards[r]) for o in orders) and orders[0] != orders[1]
    one = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=7)
    for e in range(3):
        one.set_epoch(e)
        assert _epoch_order(_shard(n, 0, 1), 7 + e) == list(one)


def test_distill_bf16_trains_the_student_against_fp32_targets(bert):
    """precision=bf16: the student's forward runs under bf16 autocast, but the teacher's targets and the
    loss stay fp32 (the same targets as outside autocast), and the student still learns."""
    from edgecomp.passes._train import resolve_precision
    from edgecomp.passes._train_distill import Weights, make_distiller

    teacher, student = tiny_encoder(), tiny_encoder()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    d = make_distiller(student, teacher, names, Weights(hidden=1.0, relation=1.0, embed_cos=1.0))
    batch = {k: torch.from_numpy(v) for k, v in token_arrays(8, seed=5).items()}
    want, _, _ = d.run_teacher([batch[n] for n in names])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _, _ = d.run_teacher([batch[n] for n in names])
        loss, parts = d(batch)
    d.close()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert resolve_precision("auto") in ("fp32", "bf16")
    for bad in (lambda: resolve_precision("fp16"), lambda: make_params("distill", {"precision": "fp16"})):
        with pytest.raises(UsageError, match="precision"):
            bad()

    handle, ctx = bert
    out = run_pass("distill", handle, ctx, num_layers=2, epochs=6, batch_size=16, lr=1e-3, precision="bf16")
    tr = out.history[-1]["training"]
    assert tr["precision"] == "bf16"
    assert np.mean(tr["loss_curve"][-4:]) < 0.8 * np.mean(tr["loss_curve"][:4])


def test_distill_narrower_student_uses_projections(bert, tmp_path: Path):
    handle, ctx = bert
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                               "num_hidden_layers": 2}))
    out = run_pass("distill", handle, ctx, student_config=str(cfg), epochs=6, batch_size=16, lr=2e-3)
    rec = out.history[-1]
    assert rec["training"]["projections"] == 3  # embeddings + 2 layers, each 16 -> 32
    assert out.torch_module.bert.config.hidden_size == 16
    assert np.mean(rec["training"]["loss_curve"][-4:]) < 0.8 * np.mean(rec["training"]["loss_curve"][:4])


def test_distill_resume_continues_from_the_saved_step(bert, tmp_path: Path):
    handle, ctx = bert
    opts = dict(num_layers=2, epochs=2, batch_size=16, lr=1e-3, seed=3)
    full = run_pass("distill", handle, ctx, checkpoint_dir=str(tmp_path / "a"), keep_checkpoints=True, **opts)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["last.pt", "step-000004.pt", "step-000008.pt"]
    resumed = run_pass("distill", handle, ctx, checkpoint_dir=str(tmp_path / "b"),
                       resume=str(tmp_path / "a" / "step-000004.pt"), **opts)
    a, b = full.history[-1]["training"], resumed.history[-1]["training"]
    assert b["start_step"] == 4 and b["steps"] == 8
    np.testing.assert_allclose(a["loss_curve"], b["loss_curve"], rtol=1e-3)
    sa, sb = state(full.torch_module), state(resumed.torch_module)
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_distill_digits_with_labels_and_fewer_channels(digits):
    handle, ctx = digits
    out = run_pass("distill", handle, ctx, channels_ratio=0.5, epochs=2, batch_size=64, lr=3e-3)
    rec = out.history[-1]
    assert rec["training"]["terms"] == ["kd", "relation"] and rec["training"]["data"] == "recipe:digits:train"
    assert [m.out_channels for m in out.torch_module if isinstance(m, torch.nn.Conv2d)] == [8, 16, 32]
    curve = rec["training"]["loss_curve"]
    assert np.mean(curve[-5:]) < 0.7 * np.mean(curve[:5])
    x = torch.from_numpy(np.concatenate([f["image"] for f in ctx.samples.validation]))
    with torch.no_grad():
        acc = float((out.torch_module(x).argmax(1).numpy() == ctx.samples.labels).mean())
    assert acc > 0.9


def test_distill_under_torchrun_two_ranks_agree(tmp_path: Path):
    """The same pass code under `torchrun --nproc_per_node 2` (DDP, gloo): both ranks end bit-identical."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    np.savez(tmp_path / "data.npz", **token_arrays(48, 5))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "USE_TF": "0"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "edgecomp.passes.distill",
           "test_passes_compress:tiny_encoder", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "out"),
           "--set", "num_layers=2", "--set", "epochs=2", "--set", "batch_size=16", "--set", "lr=1e-3", "--every-rank"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert rec["training"]["world_size"] == 2 and rec["training"]["steps"] == 6  # 48 samples / global batch 16, 2 epochs
    r0 = torch.load(tmp_path / "out" / "student.rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "out" / "student.rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    start = tiny_encoder().state_dict()
    assert not torch.equal(r0["bert.encoder.layer.0.output.dense.weight"], start["bert.encoder.layer.0.output.dense.weight"])
    assert (tmp_path / "out" / "checkpoints" / "last.pt").is_file()


def test_prune_structured_heads_and_neurons_shrink_tensors(bert):
    handle, ctx = bert
    out = run_pass("prune-structured", handle, ctx, ratio=0.5)
    rec = out.history[-1]
    # per layer: 2 heads of 8 dims (q, k, v rows + biases, o columns) and 32 FFN neurons (W1 row + bias, W2 column)
    per_layer = 2 * (3 * (8 * HIDDEN + 8) + 8 * HIDDEN) + 32 * (HIDDEN + 1 + HIDDEN)
    assert rec["params_before"] - rec["params_after"] == LAYERS * per_layer
    for layer in out.torch_module.bert.encoder.layer:
        assert layer.attention.self.query.weight.shape == (16, HIDDEN)
        assert layer.attention.output.dense.weight.shape == (HIDDEN, 16)
        assert layer.intermediate.dense.weight.shape == (32, HIDDEN)
        assert layer.output.dense.weight.shape == (HIDDEN, 32)
    assert all(len(v) == 2 for v in rec["removed"]["heads_removed"].values())
    assert rec["shares_removed"] == {"heads": 0.5, "neurons": 0.5}
    assert rec["linear_conv_macs_after"] < 0.55 * rec["linear_conv_macs_before"]
    e0, e1 = embed(handle.torch_module, ctx.samples.validation), embed(out.torch_module, ctx.samples.validation)
    assert e1.shape == e0.shape


def test_prune_structured_shares_round_to_the_nearest_unit():
    """40 % of 12 heads removes 5 (41.7 %), not 4 (33 %): the share reached is the closest to the one asked, per layer
    and over all layers, and every group keeps a unit."""
    from edgecomp.passes.prune_structured import select

    scores = {0: torch.arange(12.0), 1: torch.arange(12.0).flip(0)}
    assert select(scores, 0.4, "layer") == {0: [0, 1, 2, 3, 4], 1: [7, 8, 9, 10, 11]}
    assert sum(map(len, select(scores, 0.4, "global").values())) == 10  # 9.6 of 24
    assert select(scores, 0.3, "layer")[0] == [0, 1, 2, 3]  # 3.6 -> 4
    assert select(scores, 0.2, "layer")[0] == [0, 1]  # 2.4 -> 2
    assert select({0: torch.arange(2.0)}, 0.9, "layer") == {0: [0]}


def test_prune_structured_taylor_global(bert):
    handle, ctx = bert
    out = run_pass("prune-structured", handle, ctx, ratio=0.5, importance="taylor", scope="global", batch_size=16)
    rec = out.history[-1]
    layers = out.torch_module.bert.encoder.layer
    assert sum(layer.attention.self.num_attention_heads for layer in layers) == LAYERS * HEADS // 2
    assert sum(layer.intermediate.dense.out_features for layer in layers) == LAYERS * FFN // 2
    assert all(layer.attention.self.num_attention_heads >= 1 for layer in layers)
    assert rec["params_after"] < rec["params_before"]


def test_prune_structured_iterative_rounds_reach_the_oneshot_shape(bert):
    """Three rounds of cut -> recover follow the cubic schedule (shares of the units the model began with) and
    end with exactly the one-shot unit counts; every round's recovery is recorded."""
    handle, ctx = bert
    out = run_pass("prune-structured", handle, ctx, ratio=0.5, schedule="iterative", iterations=3, recover_steps=5,
                   batch_size=16, lr=1e-3)
    rec = out.history[-1]
    for layer in out.torch_module.bert.encoder.layer:
        assert layer.attention.self.num_attention_heads == HEADS // 2
        assert layer.intermediate.dense.out_features == FFN // 2
    goals = [r["goal"]["heads"] for r in rec["rounds"]]
    assert goals == [round(0.5 * (1 - (1 - k / 3) ** 3), 4) for k in (1, 2, 3)] and goals[-1] == 0.5
    params = [r["params"] for r in rec["rounds"]]
    assert params == sorted(params, reverse=True) and params[0] < rec["params_before"] and params[-1] == rec["params_after"]
    assert all(len(set(v)) == HEADS // 2 for v in rec["removed"]["heads_removed"].values())  # original indices, no repeats
    assert rec["removed"]["heads_before"] == LAYERS * HEADS and rec["removed"]["neurons_before"] == LAYERS * FFN
    assert sum(rec["removed"]["neurons_removed"].values()) == LAYERS * FFN // 2
    assert [r["steps"] for r in rec["recovery"]] == [5, 5, 5]
    assert rec["params_after"] == run_pass("prune-structured", handle, ctx, ratio=0.5).history[-1]["params_after"]


def test_prune_structured_iterative_needs_recovery(bert):
    handle, ctx = bert
    with pytest.raises(UsageError, match="recovers between cuts"):
        run_pass("prune-structured", handle, ctx, ratio=0.5, schedule="iterative")
    with pytest.raises(UsageError, match="iterative schedule starts over"):
        make_params("prune-structured", {"schedule": "iterative", "resume": "x.pt", "recover_steps": 5})


def test_refit_linear_absorbs_units_that_are_linear_in_the_kept_ones():
    """A removed input that is a linear combination of kept ones costs nothing after the least-squares refit;
    the mean fold alone cannot carry its variation."""
    from edgecomp.passes._torch_util import input_moments
    from edgecomp.passes.prune_structured import _fold, refit_linear

    gen = torch.Generator().manual_seed(0)
    kept = torch.randn(4096, 6, generator=gen)
    x = torch.cat([kept, kept[:, :2] @ torch.tensor([[0.5], [-2.0]]) + 1.0], 1)  # input 6 = 0.5 x0 - 2 x1 + 1
    lin = torch.nn.Linear(7, 3)
    with torch.no_grad():
        y = lin(x)
    stat = input_moments(lin, [lin], [x], cov=True)[id(lin)]
    w, b = refit_linear(lin, list(range(6)), stat)
    err_refit = ((kept.double() @ w.T + b).float() - y).abs().max()
    assert err_refit < 0.01 * y.std(), (err_refit, y.std())
    folded = torch.nn.Linear(7, 3)
    folded.load_state_dict(lin.state_dict())
    _fold(folded, [6], stat[0])
    with torch.no_grad():
        err_fold = (kept @ folded.weight[:, :6].T + folded.bias - y).abs().max()
    assert err_fold > 0.3 * y.std() and err_fold > 20 * err_refit, (err_fold, err_refit)


def test_prune_structured_variance_refit_beats_magnitude(bert):
    """Variance importance + least-squares refit keeps the embedding closer to the unpruned model's than
    magnitude scores with the mean fold, at the same 50 % of heads and neurons."""
    handle, ctx = bert
    e0 = embed(handle.torch_module, ctx.samples.validation)

    def error(**options) -> float:  # 1 - mean cosine to the unpruned embedding
        out = run_pass("prune-structured", handle, ctx, ratio=0.5, **options)
        return 1 - float(torch.nn.functional.cosine_similarity(embed(out.torch_module, ctx.samples.validation), e0).mean())

    plain, refit, best = error(importance="magnitude", refit=False), error(importance="magnitude"), error()
    assert refit < 0.7 * plain and best < 0.7 * plain, (plain, refit, best)


def test_prune_structured_error_correcting_refit_beats_the_per_layer_refit(bert):
    """Solving each layer's output weights on the pruned model's own inputs, against the unpruned model's sums,
    first layer to last, brings the pruned embedding closer to the unpruned one than refitting each layer alone."""
    handle, ctx = bert
    e0 = embed(handle.torch_module, ctx.samples.validation)

    def run(**options) -> tuple[float, dict]:
        out = run_pass("prune-structured", handle, ctx, ratio=0.5, **options)
        cos = torch.nn.functional.cosine_similarity(embed(out.torch_module, ctx.samples.validation), e0).mean()
        return 1 - float(cos), out.history[-1]

    per_layer, rec0 = run(refit_samples=0)
    corrected, rec = run()
    assert corrected < 0.8 * per_layer, (corrected, per_layer)
    assert rec["error_correcting_refit"]["samples"] == 64 and "error_correcting_refit" not in rec0  # all the train data
    assert rec["params_after"] == rec0["params_after"]


def test_correct_layers_undoes_a_damaged_layer():
    """A sublayer whose inputs match the unpruned model's gets its weights back from the solve (up to the ridge term),
    so the corrected copy reproduces the original's output."""
    from edgecomp.passes._refit import correct_layers

    teacher = tiny_encoder()
    student = tiny_encoder()
    with torch.no_grad():
        student.bert.encoder.layer[1].output.dense.weight.add_(0.2 * torch.randn(HIDDEN, FFN))
    arrays = {k: torch.from_numpy(v) for k, v in token_arrays(256, 3).items()}
    args = [arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    test = [torch.from_numpy(v) for v in token_arrays(32, 4).values()]
    with torch.no_grad():
        before = (student(*test) - teacher(*test)).abs().max()
        assert correct_layers(student, teacher, [(args, arrays["attention_mask"])]) == 256
        after = (student(*test) - teacher(*test)).abs().max()
    assert before > 0.05 and after < 0.02 * before, (before, after)


def test_recovery_takes_the_distillation_loss_options(bert):
    """The shrinking passes' recovery fine-tune uses the loss weights, augmentation, dropout and precision it is given."""
    handle, ctx = bert
    fixed = run_pass("prune-structured", handle, ctx, ratio=0.5, recover_steps=30, lr=1e-3, batch_size=16,
                     embed_cos=10.0, hidden=5.0, augment=0.5, dropout=0.1, precision="bf16")
    rec = fixed.history[-1]["recovery"]
    assert rec["weights"]["embed_cos"] == 10.0 and rec["weights"]["hidden"] == 5.0 and rec["augment"] == 0.5
    assert rec["dropout"] == 0.1 and rec["precision"] == "bf16"
    assert rec["steps"] == 30 and rec["terms"] == ["hidden", "relation", "embed_cos"]


def test_prune_structured_digits_channels_with_recovery(digits):
    handle, ctx = digits
    out = run_pass("prune-structured", handle, ctx, ratio=0.5, recover_epochs=10, batch_size=32, lr=2e-3)
    rec = out.history[-1]
    net = out.torch_module
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 8), (8, 16), (16, 32)]
    assert [m.num_features for m in net if isinstance(m, torch.nn.BatchNorm2d)] == [8, 16]
    assert net[-1].in_features == 32
    assert rec["linear_conv_macs_before"] / rec["linear_conv_macs_after"] > 3.0
    assert rec["removed"]["channels_removed"] == {"0": [16, 8], "3": [32, 16], "7": [64, 32]}
    x = torch.from_numpy(np.concatenate([f["image"] for f in ctx.samples.validation]))
    with torch.no_grad():
        acc = float((net(x).argmax(1).numpy() == ctx.samples.labels).mean())
        ref = float((handle.torch_module(x).argmax(1).numpy() == ctx.samples.labels).mean())
    assert acc >= ref - 0.015, (acc, ref)  # measured: 0.9861 against 0.9917 (the issue asks for 1 point)


def test_prune_structured_iterative_digits_channels(digits):
    """Conv chains cut over two rounds end at the one-shot widths; the record keeps each chain's first width."""
    handle, ctx = digits
    out = run_pass("prune-structured", handle, ctx, ratio=0.5, schedule="iterative", iterations=2, recover_epochs=1,
                   batch_size=64, lr=2e-3)
    rec = out.history[-1]
    assert rec["removed"]["channels_removed"] == {"0": [16, 8], "3": [32, 16], "7": [64, 32]}
    assert [r["goal"]["channels"] for r in rec["rounds"]] == [0.4375, 0.5]
    assert len(rec["recovery"]) == 2


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_unstructured_one_shot_reaches_sparsity(bert, scope: str):
    handle, ctx = bert
    out = run_pass("prune-unstructured", handle, ctx, sparsity=0.6, scope=scope)
    rec = out.history[-1]
    weights = [m.weight for m in out.torch_module.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert abs(zeros / total - 0.6) < 0.01 and abs(rec["sparsity_reached"] - 0.6) < 0.01
    assert rec["nonzero_before"] - rec["nonzero_after"] == pytest.approx(zeros, abs=total * 0.002)
    assert rec["params_before"] == rec["params_after"]
    if scope == "layer":
        assert all(abs(s - 0.6) < 0.01 for s in rec["layer_sparsity"].values())


def test_prune_unstructured_iterative_with_rewinding_keeps_the_mask(bert):
    handle, ctx = bert
    out = run_pass("prune-unstructured", handle, ctx, sparsity=0.5, schedule="iterative", iterations=3, rewind=True,
                   rewind_step=1, recover_steps=3, batch_size=16, lr=1e-3)
    rec = out.history[-1]
    assert [r["round"] for r in rec["rounds"]] == [1, 2, 3]
    targets = [r["target"] for r in rec["rounds"]]
    assert targets == sorted(targets) and targets[-1] == 0.5
    assert len(rec["training"]) == 3 and all(t["steps"] == 3 for t in rec["training"])
    weights = [m.weight for m in out.torch_module.modules() if isinstance(m, torch.nn.Linear)]
    assert abs(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights) - 0.5) < 0.01


def test_lowrank_error_is_bounded_by_the_next_singular_value(bert):
    handle, ctx = bert
    out = run_pass("lowrank", handle, ctx, ratio=0.4)
    rec = out.history[-1]
    names = {r["layer"]: r for r in rec["factorized"]}
    assert rec["layers_factorized"] == 25 and rec["layers_skipped"] == 0  # 4 x 6 Linears + the pooler
    expected = sum(r["rank"] * sum(r["shape"]) - r["shape"][0] * r["shape"][1] for r in names.values())
    assert rec["params_after"] - rec["params_before"] == expected
    x = torch.randn(64, HIDDEN)
    original = dict(handle.torch_module.named_modules())
    new = dict(out.torch_module.named_modules())
    for name, r in names.items():
        assert r["rank"] == int(0.4 * r["shape"][0] * r["shape"][1] / sum(r["shape"]))
        lin, low = original[name], new[name]
        xin = x if lin.in_features == HIDDEN else torch.randn(64, lin.in_features)
        with torch.no_grad():
            err = (lin(xin) - low(xin)).norm(dim=1)
        assert bool((err <= r["sigma_next"] * xin.norm(dim=1) * 1.001 + 1e-5).all()), name


def test_lowrank_energy_skips_layers_that_would_not_shrink(bert):
    handle, ctx = bert
    out = run_pass("lowrank", handle, ctx, energy=0.9, embeddings=True)
    rec = out.history[-1]
    assert rec["layers_skipped"] > 0
    for r in rec["skipped"]:
        m, n = r["shape"]
        assert r["rank"] * (m + n) >= m * n and "no saving" in r["reason"]
    for r in rec["factorized"]:
        assert r["energy_kept"] >= 0.9 and r["rank"] * sum(r["shape"]) < r["shape"][0] * r["shape"][1]


def test_share_reuses_the_same_parameters(bert):
    handle, ctx = bert
    out = run_pass("share", handle, ctx, group_size=2, init="mean", recover_steps=2, batch_size=16)
    rec = out.history[-1]
    layers = out.torch_module.bert.encoder.layer
    assert layers[0] is layers[1] and layers[2] is layers[3] and layers[0] is not layers[2]
    assert layers[0].attention.self.query.weight is layers[1].attention.self.query.weight
    assert rec["params_before"] - rec["params_after"] == 2 * LAYER_PARAMS
    assert rec["groups"] == [[0, 1], [2, 3]] and rec["unique_layers_after"] == 2
    assert rec["linear_conv_macs_before"] == rec["linear_conv_macs_after"]
    assert "not FLOPs" in rec["effect"] or "FLOPs and latency do not change" in rec["effect"]
    assert rec["recovery"]["steps"] == 2


def test_cli_build_with_compression_passes(tmp_path: Path):
    from conftest import run_cli

    profile = tmp_path / "ort-loose.toml"
    profile.write_text('schema = 1\nname = "ort-loose"\nbackend = "onnxruntime"\nprecision = "fp32"\nthreads = 1\n'
                       '[budget]\ntop1_agreement = 0.9\naccuracy_drop = 0.05\n')
    out = tmp_path / "out"
    proc = run_cli("build", "digits", "--pass", "prune-structured:ratio=0.25,recover_epochs=1,lr=3e-3",
                   "--pass", "prune-unstructured:sparsity=0.3,scope=global", "--target", str(profile), "--out", str(out), "--no-bench",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    passes = report["targets"][0]["passes"]
    assert [p["pass"] for p in passes] == ["prune-structured", "prune-unstructured", "export"]
    structured = passes[0]
    assert structured["params_after"] < structured["params_before"] and structured["recovery"]["loss_curve"]
    assert abs(passes[1]["sparsity_reached"] - 0.3) < 0.01
    assert report["targets"][0]["parity"]["outputs"]["logits"]["top1_agreement"] >= 0.9
