#!/usr/bin/env python
"""Check (or filter) training text for the minilm recipe: no line may be a held-out sentence's near-duplicate.

A line is a near-duplicate when the teacher (all-MiniLM-L6-v2, mean pooling) puts it within cosine `--max-cos`
(0.85) of a calibration or validation sentence. Training on those would make the held-out figures of
tools/distill_minilm.py and tools/prune_minilm.py look better than they are. A flagged line of
models/data/sentences.txt (its split is random, so it cannot simply be deleted without changing every split)
goes into models/data/train_exclude.txt; a flagged line of train_sentences.txt is deleted.

    .venv/bin/python tools/check_corpus.py                          # the recipe's whole train split: exit 1 if any
    .venv/bin/python tools/check_corpus.py new.txt --keep kept.txt  # new lines: write those that pass (and are new)

Prints how close the lines come to the held-out sentences, next to a sample of the recipe's own train split.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("USE_TF", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import numpy as np
    import torch

    from edgecomp.recipe import load_recipe
    from edgecomp.recipes import minilm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="text files, one sentence per line (default: the train split)")
    ap.add_argument("--keep", type=Path, help="write the lines that pass here (new ones only, first copy of each)")
    ap.add_argument("--max-cos", type=float, default=0.85)
    args = ap.parse_args()

    recipe = load_recipe("minilm")
    parts = minilm.corpus(recipe)
    held = parts["calibration"] + parts["validation"]
    if args.files:
        known = {s.casefold() for s in parts["train"] + held}
        lines, seen = [], set()
        for f in args.files:
            for s in f.read_text(encoding="utf-8").splitlines():
                s = " ".join(s.split())
                if s and s.casefold() not in known and s.casefold() not in seen:
                    seen.add(s.casefold())
                    lines.append(s)
    else:
        lines = parts["train"]
    tok, model = minilm.tokenizer(), minilm.build(recipe)

    def embed(sentences: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(sentences), 128):
            enc = tok(sentences[i:i + 128], padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                out.append(torch.nn.functional.normalize(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), dim=-1))
        return torch.cat(out)

    h = embed(held)
    closest = (embed(lines) @ h.T).max(1).values if lines else torch.zeros(0)
    bad = [(float(c), s) for c, s in zip(closest.tolist(), lines) if c >= args.max_cos]
    print(f"{len(lines)} lines, {len(bad)} within cosine {args.max_cos} of a held-out sentence; closest held-out "
          f"cosine: mean {closest.mean():.3f}, 90th percentile {closest.quantile(0.9):.3f}")
    if args.files:
        sample = [parts["train"][i] for i in np.random.default_rng(0).choice(len(parts["train"]), 2000, replace=False)]
        ref = (embed(sample) @ h.T).max(1).values
        print(f"the train split (2000 lines): mean {ref.mean():.3f}, 90th percentile {ref.quantile(0.9):.3f}")
    for c, s in sorted(bad, reverse=True)[:20]:
        print(f"  {c:.3f}  {s}")
    if args.keep:
        drop = {s for _, s in bad}
        args.keep.write_text("".join(f"{s}\n" for s in lines if s not in drop), encoding="utf-8")
        return 0
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
