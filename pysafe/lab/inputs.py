"""The lab's inputs to the activation analyses: which prompts each group holds, drawn from the test sets.

The analyses (pysafe.analysis) take ``{group: (x, start_idx)}`` arrays and model handles and know nothing of
the lab's data; this module builds those arrays from a :class:`~pysafe.lab.data.DataRecipe`:

- :func:`safe_unsafe_inputs`: the safe and the unsafe (compliant-target) versions of std_safe and
  std_unsafe, one entry per set (Figs 5 and 6);
- :func:`reference_inputs`: the same from a sampling stream disjoint from the evaluation sets, pooled: the
  inputs of the reference means μ_S and μ_U of Fig 3;
- :func:`group_inputs`: each set's headline input, the one its safety-table column scores (Fig 3);
- :func:`attacked_groups`: the soft-token-attacked std_unsafe prompts, one group per budget (Fig 7).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pysafe.lab import data as D
from pysafe.lab.attacks import attacked_inputs

JAILBREAKS = ("jb_co_task", "jb_co_text", "jb_mg_tokens", "jb_mg_text", "jb_comp")
REFERENCE_SEED_OFFSET = 104729  # the reference set's sampling stream: recipe.seed + this
PAIRED_SETS = ("std_safe", "std_unsafe")


def safe_unsafe_inputs(recipe: D.DataRecipe, n: int) -> dict[str, list]:
    """{"safe": [(x, start_idx), ...], "unsafe": [...]}: the safe version and the unsafe (compliant-target)
    version of the first ``n`` samples of std_safe and of std_unsafe, one (x, start_idx) per set; the i-th
    safe and unsafe inputs of a set share a text."""
    out = {"safe": [], "unsafe": []}
    for name in PAIRED_SETS:
        b = D.test_set(recipe, name, n)
        out["safe"].append((b.x_safe, b.start_idx))
        out["unsafe"].append((b.x_unsafe_target, b.start_idx))
    return out


def reference_recipe(recipe: D.DataRecipe) -> D.DataRecipe:
    """The recipe of the reference stream: ``recipe`` with its seed moved by REFERENCE_SEED_OFFSET."""
    return dataclasses.replace(recipe, seed=(recipe.seed + REFERENCE_SEED_OFFSET) % (2**32 - 9))


def reference_inputs(recipe: D.DataRecipe, n: int) -> dict:
    """{"safe", "unsafe"}: (x, start_idx) of the reference means' inputs, :func:`safe_unsafe_inputs` of the
    reference stream (:func:`reference_recipe`) pooled over the two sets."""
    g = safe_unsafe_inputs(reference_recipe(recipe), n)
    return {k: (np.concatenate([x for x, _ in v]), np.concatenate([s for _, s in v])) for k, v in g.items()}


def group_inputs(recipe: D.DataRecipe, n: int, sets=JAILBREAKS) -> dict:
    """{group: (x, start_idx)}: the evaluation inputs of each set's headline input (``std_safe``: the safe
    version of std_safe; ``std_unsafe``: the unsafe version of std_unsafe; a jailbreak set: its attack
    inputs that are unsafe by function), teacher-forced with the answer each carries."""
    out = {}
    b = D.test_set(recipe, "std_safe", n)
    out["std_safe"] = (b.x_safe, b.start_idx)
    b = D.test_set(recipe, "std_unsafe", n)
    out["std_unsafe"] = (b.x_unsafe_target, b.start_idx)
    for name in sets:
        b = D.test_set(recipe, name, n)
        keep = np.asarray(b.attack_unsafe, dtype=bool)
        out[name] = (b.x_attack[keep], b.start_idx[keep])
    return out


def attacked_groups(model, recipe: D.DataRecipe, attack: dict, *, n: int, device="cpu") -> tuple[dict, dict]:
    """The attacked std_unsafe prompts as groups ``{name: (ids, start_idx, embeds)}`` and the attack's
    options as recorded. ``attack``: soft-token attack options (n_soft, n_steps, eps_factor, norm,
    placement); ``eps_factors`` (a list) sweeps the budget (Fig 7), one group per budget
    (``adv_soft_tokens_eps<f>``; budget 1, or a lone budget, keeps the plain name ``adv_soft_tokens``)."""
    attack = dict(attack)
    factors = [float(f) for f in attack.pop("eps_factors", None) or [attack.pop("eps_factor", 1.0)]]
    groups = {}
    for f in factors:
        res = attacked_inputs(model, recipe, n=n, device=device, eps_factor=f, **attack)
        name = "adv_soft_tokens" if (f == 1.0 or len(factors) == 1) else f"adv_soft_tokens_eps{f:g}"
        groups[name] = (res.ids.cpu().numpy(), res.start_idx.cpu().numpy(), res.embeds.detach())
    attack["eps_factors"] = factors
    return groups, attack
