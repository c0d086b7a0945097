"""The distillation objective: a module that runs teacher and student on a batch and returns the loss.

With s, t the student's and teacher's outputs (logits or pooled embeddings), h_i / A_i hidden
states / attention maps of mapped layers (student layer i imitates teacher layer map[i]):

  kd        (1 - a) * CE(y, s) + a * T^2 * KL(softmax(t/T) || softmax(s/T))   (a = 1 without labels)
  hidden    mean_i MSE(P_i h_i^s, h_map[i]^t) over real tokens (+ the embedding output); P_i is a
            learned Linear when the widths differ, else the identity
  attention mean_i KL(A_map[i]^t || A_i^s) per real query row; maps are averaged over heads when
            the head counts differ
  relation  MSE(C(s), C(t)), C(x) = the batch's pairwise cosine-similarity matrix
  embed_cos mean(1 - cos(s, t));  embed_mse  MSE(s, t)
  total     = sum of weight * term over the terms with a non-zero weight that the model supports.

The teacher is held outside the module's registered children, so only the student and the
projections are trained, checkpointed and synchronised by DDP. Hidden states and attention maps
are read with forward hooks (BERT-like encoders: `embeddings`, `encoder.layer[i]`,
`layer.attention.self` returning (context, probs)), so any wrapper around the encoder (pooling
heads included) is distilled through its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgecomp.passes._torch_util import find_transformer

CACHE_MAX = 8 << 30  # bytes of cached teacher outputs per process at most; past the limit the teacher simply runs
TERMS = ("kd", "hidden", "attention", "relation", "embed_cos", "embed_mse")


@dataclass(frozen=True)
class Weights:
    kd: float = 0.0
    hidden: float = 0.0
    attention: float = 0.0
    relation: float = 0.0
    embed_cos: float = 0.0
    embed_mse: float = 0.0
    alpha: float = 0.5
    temperature: float = 2.0


class Taps:
    """Forward hooks that collect hidden states (embedding output + each layer's output) and attention
    probabilities, in call order: a layer used twice (shared weights) is recorded twice."""

    def __init__(self, module: Any, attention: bool) -> None:
        import torch

        self.hidden: list[Any] = []
        self.attn: list[Any] = []
        self.handles = []
        tr = find_transformer(module)
        self.ok = tr is not None
        if not self.ok:
            return
        self.handles.append(tr.embeddings.register_forward_hook(lambda m, a, o: self.hidden.append(o)))
        unique = list({id(layer): layer for layer in tr.encoder.layer}.values())
        for layer in unique:
            self.handles.append(layer.register_forward_hook(lambda m, a, o: self.hidden.append(o[0] if isinstance(o, tuple) else o)))
            if attention:
                sa = layer.attention.self
                if isinstance(getattr(sa, "dropout", None), torch.nn.Dropout):  # its input: the probs before dropout
                    self.handles.append(sa.dropout.register_forward_hook(lambda m, a, o: self.attn.append(a[0])))
                else:
                    self.handles.append(sa.register_forward_hook(self._attn))

    def _attn(self, mod: Any, args: Any, out: Any) -> None:
        probs = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        if probs is not None:
            self.attn.append(probs)

    def take(self) -> tuple[list[Any], list[Any]]:
        h, a = self.hidden, self.attn
        self.hidden, self.attn = [], []
        return h, a

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def default_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer i imitates the output of teacher layer round((i + 1) * n_t / n_s) - 1 (uniform, block ends)."""
    return [max(0, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student)]


def _layers(module: Any) -> tuple[int, int]:
    tr = find_transformer(module)
    if tr is None:
        return 0, 0
    return len(tr.encoder.layer), int(tr.config.hidden_size)


def make_distiller(student: Any, teacher: Any, input_names: list[str], weights: Weights,
                   layer_map: list[int] | None = None, augment: float = 0.0, vocab: Any = None,
                   teacher_forcing: float = 0.0, forcing_until: float = 0.5) -> Any:
    import torch
    import torch.nn.functional as F

    class Distiller(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student
            object.__setattr__(self, "teacher", teacher)  # not a child: frozen, not saved, not synced
            ns, ws = _layers(student)
            nt, wt = _layers(teacher)
            self.transformer = ns > 0 and nt > 0
            self.w = weights
            self.layer_map = list(layer_map) if layer_map else (default_layer_map(ns, nt) if self.transformer else [])
            if self.transformer and (len(self.layer_map) != ns or max(self.layer_map) >= nt or min(self.layer_map) < 0):
                raise ValueError(f"layer_map {self.layer_map} must give one teacher layer in [0, {nt}) per student layer ({ns})")
            use_hidden = self.transformer and weights.hidden > 0
            self.proj = torch.nn.ModuleList(
                [torch.nn.Linear(ws, wt) for _ in range(ns + 1)] if use_hidden and ws != wt else [])
            # a narrower encoder's pooled output is mapped to the teacher's width for embed_cos / embed_mse
            self.out_proj = torch.nn.Linear(ws, wt) if self.transformer and ws != wt else None
            want_attn = self.transformer and weights.attention > 0
            self.s_taps = Taps(student, want_attn) if self.transformer else None
            self.t_taps = Taps(teacher, want_attn) if self.transformer else None
            forcing = self.transformer and teacher_forcing > 0
            self.hid_used = {0} | {j + 1 for j in self.layer_map} if use_hidden or forcing else set()
            self.forced: dict[int, Any] = {}  # student layer -> the teacher hidden state it gets as input this step
            self.frac = 0.0
            if forcing:
                layers = find_transformer(student).encoder.layer
                self.s_taps.handles += [layers[i].register_forward_pre_hook(self._force(i)) for i in range(1, len(layers))]
            self.att_used = set(self.layer_map) if want_attn else set()
            self.cache: dict[int, tuple[Any, list[Any], list[Any]]] = {}
            self.cache_bytes = 0
            self.cache_limit = cache_limit()

        def set_progress(self, frac: float) -> None:
            """Called by the training loop before each step (share of the run done)."""
            self.frac = frac

        def _force(self, i: int) -> Any:
            def hook(mod: Any, args: Any) -> Any:
                h = self.forced.get(i)
                return None if h is None else (h, *args[1:])
            return hook

        def forcing_probability(self) -> float:
            """Teacher forcing (progressive module replacing, BERT-of-Theseus style): student layer i > 0 gets,
            with this probability, the teacher's hidden state that layer i-1 imitates as its input, so each
            layer first learns its block's function on the teacher's own states; it falls linearly to 0 at
            `forcing_until` of the run, after which the student runs on its own."""
            if teacher_forcing <= 0 or forcing_until <= 0:
                return 0.0
            return teacher_forcing * max(0.0, 1.0 - self.frac / forcing_until)

        def terms(self) -> list[str]:
            """The loss terms this student/teacher pair actually uses."""
            return [t for t in TERMS if getattr(self.w, t) > 0 and (t not in ("hidden", "attention") or self.transformer)]

        def forward(self, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if self.training and augment > 0 and "input_ids" in batch and "attention_mask" in batch:
                batch = augment_tokens(batch, augment, vocab)
            batch = trim_padding(batch)
            args = [batch[n] for n in input_names]
            mask = batch.get("attention_mask")
            with torch.autocast("cpu", enabled=False):  # fp32 targets, whatever the student runs in
                t_out, t_hid, t_att = self.teach(batch, args, mask)
                t_hid, t_att = [_fp32(h) for h in t_hid], [_fp32(a) for a in t_att]
            p = self.forcing_probability() if self.training else 0.0
            self.forced = {i: t_hid[j + 1] for i, j in enumerate(self.layer_map[:-1], start=1)
                           if p > 0 and float(torch.rand(())) < p}
            s_out = self.student(*args)
            self.forced = {}
            s_hid, s_att = self.s_taps.take() if self.s_taps else ([], [])
            with torch.autocast("cpu", enabled=False):  # under bf16 training the loss is still taken in fp32
                return self.loss(batch, mask, _fp32(s_out), [_fp32(h) for h in s_hid], [_fp32(a) for a in s_att],
                                 t_out, t_hid, t_att)

        def loss(self, batch: dict[str, Any], mask: Any, s_out: Any, s_hid: list[Any], s_att: list[Any],
                 t_out: Any, t_hid: list[Any], t_att: list[Any]) -> tuple[Any, dict[str, Any]]:
            parts: dict[str, Any] = {}
            w = self.w
            if w.kd > 0:
                T = w.temperature
                kl = F.kl_div(F.log_softmax(s_out / T, -1), F.log_softmax(t_out / T, -1), reduction="batchmean",
                              log_target=True) * T * T
                labels = batch.get("labels")
                parts["kd"] = kl if labels is None else (1 - w.alpha) * F.cross_entropy(s_out, labels) + w.alpha * kl
            s_emb = self.out_proj(s_out) if self.out_proj is not None and s_out.shape[-1] != t_out.shape[-1] else s_out
            if w.embed_cos > 0:
                parts["embed_cos"] = (1 - F.cosine_similarity(s_emb.flatten(1), t_out.flatten(1), dim=-1)).mean()
            if w.embed_mse > 0:
                parts["embed_mse"] = F.mse_loss(s_emb, t_out)
            if w.relation > 0:
                parts["relation"] = F.mse_loss(_cos_matrix(s_out), _cos_matrix(t_out))
            if w.hidden > 0 and self.transformer:
                pairs = [(0, 0)] + [(i + 1, j + 1) for i, j in enumerate(self.layer_map)]
                losses = []
                for k, (i, j) in enumerate(pairs):
                    h = self.proj[k](s_hid[i]) if len(self.proj) else s_hid[i]
                    losses.append(_masked_mse(h, t_hid[j], mask))
                parts["hidden"] = torch.stack(losses).mean()
            if w.attention > 0 and self.transformer and s_att and t_att:
                losses = [_attn_kl(s_att[i], t_att[j], mask) for i, j in enumerate(self.layer_map)]
                parts["attention"] = torch.stack(losses).mean()
            total = sum(getattr(w, k) * v for k, v in parts.items())
            return total, {k: v.detach() for k, v in parts.items()}

        def teach(self, batch: dict[str, Any], args: list[Any], mask: Any) -> tuple[Any, list[Any], list[Any]]:
            """The teacher's output, hidden states and attention maps for the batch. The teacher is
            frozen and deterministic, so each sample's are computed once and cached by the sample's
            `_idx`, cut to its real length. The teacher runs only on the rows not cached yet (the first
            epoch's, and augmented rows, which are new text every time): with augmentation nearly every
            batch holds such rows, and the rest still come from the cache. States come back in fp16
            (`_targets`)."""
            idx = batch.get("_idx")
            if idx is None:
                return _targets(*self.run_teacher(args))
            keys = idx.tolist()
            miss = [b for b, i in enumerate(keys) if i < 0 or i not in self.cache]
            fresh: dict[int, tuple[Any, list[Any], list[Any]]] = {}
            if miss:
                sub = torch.tensor(miss, dtype=torch.long)
                t_out, t_hid, t_att = _targets(*self.run_teacher([a[sub] for a in args]))
                lens = mask[sub].sum(1).tolist() if mask is not None else [None] * len(miss)
                for r, (b, n) in enumerate(zip(miss, lens)):
                    row = (t_out[r].clone(), [None if h is None else h[r, :n].clone() for h in t_hid],
                           [None if a is None else a[r, :, :n, :n].clone() for a in t_att])
                    fresh[b] = row
                    if keys[b] >= 0 and self.cache_bytes < self.cache_limit:
                        self.cache[keys[b]] = row
                        self.cache_bytes += sum(t.numel() * t.element_size() for t in [row[0], *row[1], *row[2]]
                                                if t is not None)
                if len(miss) == len(keys):
                    return t_out, t_hid, t_att
            rows = [fresh[b] if b in fresh else self.cache[i] for b, i in enumerate(keys)]
            seq = mask.shape[1] if mask is not None else None
            t_out = torch.stack([r[0] for r in rows])
            t_hid = [None if rows[0][1][k] is None else torch.stack([_pad(r[1][k], seq, (0,)) for r in rows])
                     for k in range(len(rows[0][1]))]
            t_att = [None if rows[0][2][k] is None else torch.stack([_pad(r[2][k], seq, (1, 2)) for r in rows])
                     for k in range(len(rows[0][2]))]
            return t_out, t_hid, t_att

        def run_teacher(self, args: list[Any]) -> tuple[Any, list[Any], list[Any]]:
            """One teacher forward (eval mode, no grad): output, and the hidden states / attention maps the
            loss uses (None in the others' places)."""
            was = teacher.training
            teacher.eval()
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                t_out = teacher(*args)
            teacher.train(was)
            t_hid, t_att = self.t_taps.take() if self.t_taps else ([], [])
            return (t_out, [h if k in self.hid_used else None for k, h in enumerate(t_hid)],
                    [a if k in self.att_used else None for k, a in enumerate(t_att)])

        def close(self) -> None:
            for taps in (self.s_taps, self.t_taps):
                if taps is not None:
                    taps.remove()

    return Distiller()


def _targets(out: Any, hid: list[Any], att: list[Any]) -> tuple[Any, list[Any], list[Any]]:
    """The teacher's hidden states and attention maps as the cache keeps them: fp16 (a relative error of
    5e-4, far below any student's), so twice as many samples fit: MiniLM's 57k training sentences carry
    9.4 GB of fp32 states for a pruned 6-layer student, more than the cache may hold. Fresh rows are
    rounded the same way, so a target does not depend on whether it came from the cache, and a resumed
    run matches an uninterrupted one. A state outside fp16's range stays fp32; the loss takes fp32."""
    import torch

    def half(x: Any) -> Any:
        if x is None:
            return None
        y = x.to(torch.float16)
        return y if bool(torch.isfinite(y).all()) else x

    return out, [half(h) for h in hid], [half(a) for a in att]


def _fp32(x: Any) -> Any:
    import torch

    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def cache_limit() -> int:
    """Bytes of teacher outputs one training process may cache: a quarter of the free memory now (page cache not counted),
    shared by the processes on this machine (torchrun's LOCAL_WORLD_SIZE), at most CACHE_MAX."""
    import os

    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 8 << 30
    return int(min(CACHE_MAX, free // 4 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def augment_tokens(batch: dict[str, Any], p: float, vocab: Any = None) -> dict[str, Any]:
    """New inputs for the teacher to label (TinyBERT-style augmentation, without an extra model): each
    sample is, with probability p, rewritten by one of
      replace  10-40% of its tokens swapped for words of the tokenizer's vocabulary (`vocab`: ids of
               whole words) or, without one, for tokens of other samples in the batch
      delete   15% of its tokens dropped
      splice   its first part joined to the second part of another sample
    The first and last real tokens ([CLS], [SEP]) stay. Uses torch's global RNG (seeded, checkpointed).
    Augmented samples lose their `_idx`, so the teacher runs on them instead of its cache."""
    import torch

    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    n, seq = ids.shape
    lengths = mask.sum(1)
    pool = torch.cat([ids[i, 1:max(2, int(lengths[i]) - 1)] for i in range(n)])
    pad = int(ids[mask == 0][0]) if bool((mask == 0).any()) else 0
    idx = batch["_idx"].clone() if "_idx" in batch else None
    for i in range(n):
        if float(torch.rand(())) >= p or lengths[i] < 4:
            continue
        body = ids[i, 1:int(lengths[i]) - 1]
        op = int(torch.randint(3, ()))
        if op == 0:
            hit = torch.rand(len(body)) < 0.1 + 0.3 * float(torch.rand(()))
            src = vocab if vocab is not None else pool
            body = torch.where(hit, src[torch.randint(len(src), (len(body),))], body)
        elif op == 1:
            keep = torch.rand(len(body)) >= 0.15
            body = body[keep] if keep.any() else body[:1]
        else:
            j = int(torch.randint(n, ()))
            other = ids[j, 1:max(2, int(lengths[j]) - 1)]
            body = torch.cat([body[:max(1, len(body) // 2)], other[len(other) // 2:]])[:seq - 2]
        row = torch.cat([ids[i, :1], body, ids[i, int(lengths[i]) - 1:int(lengths[i])]])
        ids[i] = pad
        ids[i, :len(row)] = row
        mask[i] = 0
        mask[i, :len(row)] = 1
        if idx is not None:
            idx[i] = -1
    out = dict(batch, input_ids=ids, attention_mask=mask)
    if idx is not None:
        out["_idx"] = idx
    return out


def trim_padding(batch: dict[str, Any]) -> dict[str, Any]:
    """Cut trailing padding columns shared by the whole batch. Exact for encoders with an attention mask:
    padded keys get zero attention and masked pooling ignores padded positions."""
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    seq = mask.shape[1]
    keep = int(mask.sum(1).max())
    if keep >= seq or bool(mask[:, keep:].any()):  # nothing to cut, or left padding: keep the batch whole
        return batch
    return {k: (v[:, :keep] if v.ndim == 2 and v.shape[1] == seq else v) for k, v in batch.items()}


def _pad(x: Any, seq: int | None, dims: tuple[int, ...]) -> Any:
    """Zero-pad (or cut) the given dims of a cached tensor to the batch's sequence length."""
    import torch.nn.functional as F

    if seq is None:
        return x
    pad: list[int] = []
    for d in reversed(range(x.ndim)):
        pad += [0, seq - x.shape[d]] if d in dims else [0, 0]
    return F.pad(x, pad)


def _cos_matrix(x: Any) -> Any:
    import torch.nn.functional as F

    z = F.normalize(x.flatten(1), dim=-1)
    return z @ z.T


def _masked_mse(a: Any, b: Any, mask: Any) -> Any:
    if mask is None:
        return ((a - b) ** 2).mean()
    m = mask.unsqueeze(-1).to(a.dtype)
    return (((a - b) ** 2) * m).sum() / (m.sum() * a.shape[-1])


def _attn_kl(s: Any, t: Any, mask: Any) -> Any:
    """KL(t || s) per query row, mean over heads and real query positions (probs: [B, H, Q, K])."""
    import torch

    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    kl = (t * (torch.log(t.clamp_min(1e-9)) - torch.log(s.clamp_min(1e-9)))).sum(-1)  # [B, H, Q]
    if mask is None:
        return kl.mean()
    m = mask[:, None, :].to(kl.dtype)
    return (kl * m).sum() / (m.sum() * kl.shape[1])
