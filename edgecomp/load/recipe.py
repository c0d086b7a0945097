"""A recipe from models/: build the torch module with the recipe's builder."""

from __future__ import annotations

from edgecomp.model import ModelHandle
from edgecomp.recipe import Recipe


def load_from_recipe(recipe: Recipe) -> ModelHandle:
    module = recipe.module().build(recipe)
    prov = {"recipe": recipe.name, "format": "recipe", "builder": recipe.builder, "path": str(recipe.path)}
    return ModelHandle(recipe.name, recipe.inputs, recipe.outputs, prov, torch_module=module)
