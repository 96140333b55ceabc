"""Recipes: which representation each Linear of a model gets.

A recipe is a dict, or a YAML / JSON file holding one, in either form::

    rules:                                   # first matching rule wins
      - match: "model.layers.*.mlp.*_proj"   # glob on the module name
        method: lowrank
        ratio: 0.2                           # the method's settings
      - match: "re:model\\.layers\\.(0|1)\\..*"   # "re:" → Python regex (fullmatch)
        method: skip

    # or the short mapping form, pattern → settings (or just a method name):
    "model.layers.*.self_attn.*_proj": {method: int8}
    "lm_head": skip

    # "{blocks}" stands for the model's list of transformer blocks (the ModuleList holding the most
    # Linears: Llama "model.layers", GPT-2 "transformer.h", OPT "model.decoder.layers", Falcon
    # "transformer.h", GPT-NeoX "gpt_neox.layers"), so a recipe serves every architecture:
    "{blocks}.*": int4                       # every Linear of every block; lm_head and the rest stay dense

Only ``nn.Linear`` modules are matched — and Hugging Face's ``Conv1D`` (GPT-2 style: weight stored
[in, out]), which ``compress`` first swaps for the equivalent ``nn.Linear``; Linears no rule matches
stay dense.
Validation happens before anything is compressed: an unknown method or
setting, a pattern that matches no Linear, settings that do not fit a layer's
shape, or a method that needs calibration data when none is given → ValueError.
"""
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .._linear import linear_from
from .blocks import expand_blocks
from .experts import fused_hint
from .methods import get_method

_TOP_KEYS = {"rules", "name", "description"}

# The default recipe (also reparam_kernels/recipes/default.yaml): activation-aware low rank with
# output channels weighted by the loss's Fisher, 20% fewer parameters in the Linears of the transformer
# blocks as a whole (in a Llama-style model: the attention and MLP projections), ranks allocated globally
# (some layers stay dense), factors stored pivoted (a larger rank for the same parameters).
DEFAULT_RECIPE = {"name": "lowrank-pivoted-fisher-global-20", "rules": [
    {"match": "{blocks}.*", "method": "lowrank", "ratio": 0.2, "whiten": True, "fisher": True, "allocate": "global",
     "pivoted": True}]}


@dataclass
class Rule:
    pattern: str
    method: str
    settings: dict = field(default_factory=dict)

    def matches(self, name):
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)

    def to_dict(self):
        return {"match": self.pattern, "method": self.method, **self.settings}


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def builtin_recipes():
    """Names of the recipes shipped in reparam_kernels/recipes (default, int8, int4, int4-gptq, …)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def _read_file(path):
    name = str(path)
    path = Path(path)
    if not path.is_file() and name in builtin_recipes():  # a built-in name; a file of that name wins
        path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"`recipe`: file {path} does not exist, nor is it a built-in recipe "
                         f"({', '.join(builtin_recipes())})")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        return json.loads(text)
    import yaml

    return yaml.safe_load(text)


def _rule(entry, where):
    if isinstance(entry, str):
        entry = {"method": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"`recipe` {where}: expected a mapping with `match` and `method`, got {entry!r}")
    entry = dict(entry)
    pattern, method = entry.pop("match", None), entry.pop("method", None)
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"`recipe` {where}: `match` must be a non-empty pattern string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"`recipe` {where}: bad regex {pattern!r}: {e}") from None
    if not isinstance(method, str):
        raise ValueError(f"`recipe` {where}: `method` missing for pattern {pattern!r}")
    m = get_method(method)
    unknown = sorted(set(entry) - m.keys)
    if unknown:
        raise ValueError(f"`recipe` {where}: method {method!r} takes no setting(s) {unknown}; "
                         f"it takes {sorted(m.keys) or 'none'}")
    return Rule(pattern, method, entry)


def parse_recipe(recipe):
    """A list of Rules from a dict, a list of rule dicts, a Rule list, a YAML/JSON path or the name of a
    built-in recipe (``builtin_recipes()``: "default", "int8", "int4", "int4-gptq", "gptvq", …)."""
    if isinstance(recipe, (str, Path)):
        recipe = _read_file(recipe)
    if isinstance(recipe, list):
        recipe = {"rules": recipe}
    if not isinstance(recipe, dict) or not recipe:
        raise ValueError(f"`recipe` must be a non-empty dict, list of rules or a YAML/JSON file, got {recipe!r}")
    if "rules" in recipe:
        extra = sorted(set(recipe) - _TOP_KEYS)
        if extra:
            raise ValueError(f"`recipe`: unknown top-level key(s) {extra}; allowed {sorted(_TOP_KEYS)}")
        rules = recipe["rules"]
        if not isinstance(rules, list) or not rules:
            raise ValueError("`recipe`: `rules` must be a non-empty list")
        return [r if isinstance(r, Rule) else _rule(r, f"rule {i}") for i, r in enumerate(rules)]
    out = []
    for pattern, entry in recipe.items():
        entry = {"method": entry} if isinstance(entry, str) else dict(entry or {})
        out.append(_rule({"match": pattern, **entry}, f"pattern {pattern!r}"))
    return out


def is_conv1d(m):
    """Hugging Face's Conv1D (GPT-2 and relatives): y = x @ weight + bias with weight [in, out]. Recognized
    by name and shape so that transformers need not be imported."""
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 2 and getattr(m, "nf", None) == m.weight.shape[1])


def conv1d_as_linear(m):
    """The nn.Linear computing exactly what Conv1D `m` computes (weight transposed, same bias)."""
    lin = linear_from(m.weight.detach().t(), m.bias)
    lin.train(m.training)
    return lin


def linear_features(m):
    """(in_features, out_features) of a Linear-like module or a Conv1D; None for anything else."""
    if is_conv1d(m):
        return tuple(m.weight.shape)
    if hasattr(m, "in_features") and hasattr(m, "out_features"):
        return m.in_features, m.out_features
    return None


def plan(model, recipe, has_calib):
    """Validate `recipe` against `model`: {module name: Rule} for every Linear (or Conv1D) a rule matches."""
    rules = [Rule(expand_blocks(r.pattern, model, regex=r.pattern.startswith("re:")), r.method, r.settings)
             for r in parse_recipe(recipe)]  # "{blocks}" → the model's list of blocks ("model.layers", …)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    chosen, used = {}, [False] * len(rules)
    for name, lin in linears:
        for i, rule in enumerate(rules):
            if rule.matches(name):
                used[i] = True
                chosen[name] = rule
                break
    for i, rule in enumerate(rules):
        if not used[i] and not any(rule.matches(n) for n, _ in linears):
            examples = ", ".join(n for n, _ in linears[:4])
            raise ValueError(f"`recipe`: pattern {rule.pattern!r} matches no nn.Linear (or Conv1D) of the model "
                             f"(Linear names look like: {examples} …){fused_hint(model)}")
    mods = dict(linears)
    for name, rule in chosen.items():
        m = get_method(rule.method)
        in_f, out_f = linear_features(mods[name])
        if m.check is not None:
            try:
                m.check(out_f, in_f, rule.settings)
            except ValueError as e:
                raise ValueError(f"`recipe`: rule {rule.pattern!r} (method {rule.method}) does not fit layer "
                                 f"{name} [{out_f}×{in_f}]: {e}") from None
        if m.needs_calib is not None and m.needs_calib(rule.settings) and not has_calib:
            raise ValueError(f"`calib`: method {rule.method!r} with settings {rule.settings} (rule {rule.pattern!r}) "
                             f"needs calibration data; pass calib=token ids (calib='random': random tokens, no data) or use "
                             f"whiten=false / gptq=false / weighted_grid=false / no mean_bits")
    return {n: r for n, r in chosen.items() if r.method != "skip"}
