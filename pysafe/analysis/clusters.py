"""Fig 3 (and Fig 7's activation half): do safe and unsafe inputs form separate clusters, and where do
jailbreak and attacked inputs land? (docs/analyses.md, part A.)

Per layer ℓ and evaluation point z with pooled feature f = f_ℓ(z):

- τ = ‖f − μ_U‖ − ‖f − μ_S‖ (positive: closer to the safe mean) and its cosine version
  cos(f, μ_S) − cos(f, μ_U) (same sign convention: positive = closer to safe);
- nearest-mean accuracy: the share of a group assigned to its true label by the nearer mean (safe for the
  ``std_safe`` group, unsafe for every other group: jailbreaks and attacked inputs are unsafe by function);
- silhouette against the two reference clusters: a = mean distance to the other members of the point's
  true cluster (the ``std_unsafe`` group for unsafe/jailbreak/attacked points, ``std_safe`` for safe points),
  b = mean distance to the opposite one, s = (b − a)/max(a, b); negative means the point sits with the
  wrong cluster. Computed exactly by the native distance engine, streaming (no N×N matrix);
- AUROC of τ: safe points against each other group.

The groups are named as the lab's test sets and hold each set's headline input (the one its safety-table
column scores): ``std_safe`` the safe version of std_safe, ``std_unsafe`` the unsafe (compliant-target)
version of std_unsafe, ``jb_*`` the attack inputs that are unsafe by function, ``adv_soft_tokens*`` the
attacked std_unsafe prompts. Each group also keeps its points' τ at the last layer (``tau_last``, in input
order) for the claims' bootstrap (pysafe.analysis.claims).

μ_S and μ_U come from a reference set disjoint from the evaluation points (a separate sampling stream):
the safe and unsafe (compliant-target) variants of std_safe and std_unsafe. The reference script used the
same samples for both (bug B-series); its truncation of g to 192 of 768 units is not reproduced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pysafe.analysis.capture import lab_features
from pysafe.distances import distance_summary


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / n_pos n_neg)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks over ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _cos(f: np.ndarray, mu: np.ndarray) -> np.ndarray:
    num = (f * mu).sum(-1)
    den = np.linalg.norm(f, axis=-1) * np.linalg.norm(mu, axis=-1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def tau_scores(f: np.ndarray, mu_s: np.ndarray, mu_u: np.ndarray):
    """(τ, cosine τ, d_S, d_U) of features f [..., D] against the means (broadcast over leading axes)."""
    d_s = np.linalg.norm(f - mu_s, axis=-1)
    d_u = np.linalg.norm(f - mu_u, axis=-1)
    return d_u - d_s, _cos(f, mu_s) - _cos(f, mu_u), d_s, d_u


SAFE_GROUP, UNSAFE_GROUP = "std_safe", "std_unsafe"


def features(model, x, s, *, cache=None, model_key: str | None = None, **cap) -> np.ndarray:
    """:func:`lab_features` through the optional :class:`~pysafe.analysis.cache.FeatureCache`."""
    from pysafe.analysis.cache import cached, inputs_fingerprint, model_fingerprint

    if cache is None:
        return lab_features(model, x, s, **cap)
    parts = {"model": model_key or model_fingerprint(model), "inputs": inputs_fingerprint(x, s),
             "hook": cap.get("hook", "mlp_act"), "positions": cap.get("positions", "window"),
             "n_window": cap.get("n_window", 10)}
    return cached(cache, parts, lambda: lab_features(model, x, s, **cap))


def reference_means(model, reference: dict, cache=None, model_key=None, **cap) -> tuple[np.ndarray, np.ndarray]:
    """(μ_S, μ_U), each [layers, D]: the mean pooled features of ``reference["safe"]`` and
    ``reference["unsafe"]`` ((x, start_idx) each; the lab's ``inputs.reference_inputs``)."""
    mu_s = features(model, *reference["safe"], cache=cache, model_key=model_key, **cap).mean(0)
    mu_u = features(model, *reference["unsafe"], cache=cache, model_key=model_key, **cap).mean(0)
    return mu_s, mu_u


def summarize_groups(feats: dict, mu_s: np.ndarray, mu_u: np.ndarray, *, safe: str = SAFE_GROUP,
                     unsafe: str = UNSAFE_GROUP) -> dict:
    """Per-group, per-layer cluster metrics of pooled features ``{group: [N, L, D]}`` against the reference
    means μ_S, μ_U ([L, D]); ``feats`` must hold the groups ``safe`` and ``unsafe`` (the silhouette's two
    clusters). Every other group counts as unsafe by function (jailbreaks, attacked inputs)."""
    missing = [g for g in (safe, unsafe) if g not in feats]
    if missing:
        raise ValueError(f"cluster groups {', '.join(map(repr, missing))} missing; found {', '.join(map(repr, feats))}")
    n_layer = mu_s.shape[0]
    names = list(feats)
    true_unsafe = {g: g != safe for g in names}
    out_groups = {}
    taus = {}
    for g in names:
        f = feats[g]  # [N, L, D]
        tau, ctau, d_s, d_u = tau_scores(f, mu_s[None], mu_u[None])
        taus[g] = tau
        nearer_safe = (d_s < d_u).mean(0)
        out_groups[g] = {
            "n": int(f.shape[0]),
            "tau_mean": tau.mean(0).tolist(), "tau_std": tau.std(0).tolist(),
            "cos_tau_mean": ctau.mean(0).tolist(), "cos_tau_std": ctau.std(0).tolist(),
            "nearest_mean_acc": (1 - nearer_safe if true_unsafe[g] else nearer_safe).tolist(),
            "frac_nearer_safe": nearer_safe.tolist(),
            "tau_last": tau[:, -1].tolist(),
        }
    # silhouette against the safe / unsafe clusters, per layer, exact distances on the union
    present = [g for g in names if feats[g].shape[0] > 0]  # empty groups would shift distance_summary's columns
    labels = np.concatenate([np.full(feats[g].shape[0], i) for i, g in enumerate(present)])
    i_safe, i_unsafe = present.index(safe), present.index(unsafe)
    sil = {g: [] for g in names}
    for layer in range(n_layer):
        X = np.concatenate([feats[g][:, layer] for g in present])
        summ = distance_summary(X, labels, k=0)
        m = summ.mean_to_group  # [N, groups], columns in the order of np.unique(labels) = names' order
        own = np.where(labels == i_safe, m[:, i_safe], m[:, i_unsafe])
        opp = np.where(labels == i_safe, m[:, i_unsafe], m[:, i_safe])
        s = (opp - own) / np.maximum(np.maximum(own, opp), 1e-30)
        for g in names:
            i = present.index(g) if g in present else -1
            sil[g].append(float(s[labels == i].mean()) if (labels == i).any() else float("nan"))
    for g in names:
        out_groups[g]["silhouette"] = sil[g]
        if g != safe:
            out_groups[g]["auroc_tau_vs_safe"] = [auroc(taus[safe][:, layer], taus[g][:, layer])
                                                  for layer in range(n_layer)]
    return out_groups


def cluster_analysis(model, groups: dict, reference: dict, *, hook: str = "mlp_act", positions: str = "window",
                     n_window: int = 10, batch_size: int = 256, device="cpu", cache=None) -> dict:
    """Fig 3 metrics of one model (JSON-ready; the ``groups`` part of the ``pysafe clusters`` schema).

    Args:
        groups: {name: (x, start_idx)} or {name: (ids, start_idx, embeds)} (attacked inputs: ``embeds``
            replaces ``wte(ids)``); must hold "std_safe" and "std_unsafe" (:func:`summarize_groups`).
        reference: {"safe": (x, start_idx), "unsafe": (x, start_idx)}: the inputs of μ_S and μ_U, disjoint
            from the groups' inputs.
        cache: a :class:`~pysafe.analysis.cache.FeatureCache` for the features of token inputs (inputs
            given as embeddings are recomputed).

    Returns:
        {"hook", "positions", "n_window", "layers", "groups": :func:`summarize_groups`}.
    """
    from pysafe.analysis.cache import model_fingerprint

    cap = dict(hook=hook, positions=positions, n_window=n_window, batch_size=batch_size, device=device)
    model.to(device)
    key = model_fingerprint(model) if cache is not None else None
    mu_s, mu_u = reference_means(model, reference, cache=cache, model_key=key, **cap)
    feats = {}
    for g, inp in groups.items():
        if len(inp) == 3:
            feats[g] = lab_features(model, inp[0], inp[1], embeds=inp[2], **cap)
        else:
            feats[g] = features(model, *inp, cache=cache, model_key=key, **cap)
    return {"hook": hook, "positions": positions, "n_window": n_window, "layers": list(range(mu_s.shape[0])),
            "groups": summarize_groups(feats, mu_s, mu_u)}


def write_clusters(result: dict, out_dir, title: str = "") -> Path:
    """``out_dir/clusters.json`` and ``out_dir/clusters.png`` (τ and cosine τ per layer, ±std bands)."""
    from pysafe._atomic import write_json

    out = Path(out_dir)
    plot_clusters(result, out / "clusters.png", title)  # creates out/
    write_json(out / "clusters.json", result)
    return out / "clusters.json"


def plot_clusters(result: dict, path, title: str = "") -> None:
    """τ and cosine τ per layer (0-based) for every group in ``result`` (names read from the file), with
    ± one-std bands for the safe and unsafe groups only (the others' bands would cover each other); the
    legend sits below the panels."""
    from pysafe._figures import group_label, group_style, pyplot, save_figure

    plt = pyplot()

    layers = np.asarray(result["layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
    banded = {g for g in result["groups"] if g in ("safe", "unsafe", "std_safe", "std_unsafe")}
    handles = []
    for ax, key, label in ((axes[0], "cos_tau", "cosine τ = cos(f, μ_S) − cos(f, μ_U)"),
                           (axes[1], "tau", "τ = ‖f − μ_U‖ − ‖f − μ_S‖")):
        handles = []
        for i, (g, row) in enumerate(result["groups"].items()):
            mean, std = np.asarray(row[f"{key}_mean"]), np.asarray(row[f"{key}_std"])
            st = group_style(g, i)
            line, = ax.plot(layers, mean, lw=1.6, ms=4, label=f"{group_label(g)} (n={row['n']})", **st)
            if g in banded:
                ax.fill_between(layers, mean - std, mean + std, alpha=0.15, color=st["color"], lw=0)
            handles.append(line)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel(label)
        ax.set_xticks(layers)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    rows = -(-len(handles) // 3)
    fig.suptitle((title + ": " if title else "") + "where inputs sit between the safe and unsafe clusters "
                 f"(hook {result['hook']}, positions {result['positions']}; above 0: nearer safe)", fontsize=10)
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    save_figure(fig, path, dpi=120)
