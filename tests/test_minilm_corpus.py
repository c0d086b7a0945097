"""The minilm recipe's splits: nothing held out, nor any listed near-duplicate of it, reaches the train split."""

from __future__ import annotations

from edgecomp.paths import MODELS_DIR
from edgecomp.recipe import load_recipe
from edgecomp.recipes import minilm


def test_train_split_holds_no_held_out_sentence_nor_a_listed_near_duplicate() -> None:
    recipe = load_recipe("minilm")
    parts = minilm.corpus(recipe)
    assert (len(parts["calibration"]), len(parts["validation"])) == (64, 96)
    train = {s.casefold() for s in parts["train"]}
    held = {s.casefold() for s in parts["calibration"] + parts["validation"]}
    assert not train & held
    excluded = (MODELS_DIR / recipe.options["train_exclude"]).read_text(encoding="utf-8").splitlines()
    shipped = {s.strip().casefold() for s in (MODELS_DIR / recipe.options["corpus"]).read_text(encoding="utf-8").splitlines()}
    assert excluded and all(s.casefold() in shipped - held for s in excluded)  # listed lines are real train lines
    assert not train & {s.casefold() for s in excluded}
    assert len(parts["train"]) > 50_000
