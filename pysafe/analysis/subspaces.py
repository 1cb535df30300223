"""Figs 4 and 5: where the fine-tune's weights live (column space) and which inputs they read (row space).

Both are computed for the MLP matrices of every layer, in float64 by the native engine (its exact SVD,
rank rule and sin θ: the same definitions as ``pysafe analyze``'s records), for W_ST and ΔW = W_ST − W_IT against
W_IT (docs/analyses.md: the reference's choice is ambiguous; all are reported), with the reference's
bugs fixed (C1-C7, R1-R6): left singular vectors are columns of an economy SVD, no row centring unless
asked, k = the smallest rank reaching the energy threshold, separate outputs per matrix, chance levels.

Fig 4, column space: for the top-k_M left singular vectors u_i of M ∈ {W_ST, ΔW},
sin θ_i = ‖(I − U_IT U_ITᵀ) u_i‖ with U_IT the top-k_IT left singular vectors of W_IT. Chance: E[sin θ] of a
random unit vector against a fixed k_IT-dimensional subspace of R^out, from the engine
(:func:`pysafe.linalg.sin_theta_chance`, the same value as the ``sin_theta_*_chance`` of the records).
k_IT and k_M follow the engine's energy rule (:func:`pysafe.linalg.truncated_svd`).

Fig 5, row space: for each input a at the true MLP input (``mlp_in``) of the fine-tuned model and each
W ∈ {W_IT, W_ST, ΔW} with SVD W = Σ σ_j u_j v_jᵀ: score_j(a) = σ_j ⟨â, v_j⟩, so Σ_j score_j² = ‖W â‖²; a
small ‖W â‖ means â lies near W's (approximate) null space. Reported: mean ± std over samples of |score_j|
for the top directions, safe vs unsafe, and the mean of ‖W â‖ / σ_1.
"""

from __future__ import annotations

import numpy as np

from pysafe.linalg import sin_theta, sin_theta_chance, truncated_svd

MATRICES = ("c_fc", "c_proj")


def _svd(W: np.ndarray, center: bool, **rule):
    """The engine's exact float64 SVD of ``W`` (mean row removed with ``center``): (U, S, Vt, k), every
    singular triplet (economy size) and k from the engine's rank rule ``rule`` (its ``rank``, ``energy``,
    ``max_rank``; default: the energy 0.9)."""
    W = np.asarray(W, np.float64)
    if center:
        W = W - W.mean(0, keepdims=True)
    U, S, Vt, info = truncated_svd(np.ascontiguousarray(W), exact=True, **rule)
    return U, S, Vt, int(info["k"])


def row_scores(W: np.ndarray, a: np.ndarray, center: bool = False):
    """score[i, j] = σ_j ⟨â_i, v_j⟩ for inputs a [N, in] and W [out, in] (so Σ_j score² = ‖W̃ â‖²); returns
    (scores [N, r], σ [r])."""
    r = min(np.shape(W))
    _, S, Vt, _ = _svd(W, center, rank=r)
    if len(S) < r:  # a zero matrix: the engine returns no triplets; every σ is 0
        S, Vt = np.pad(S, (0, r - len(S))), np.pad(Vt, ((0, r - len(S)), (0, 0)))
    a = np.asarray(a, np.float64)
    a_hat = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
    return (a_hat @ Vt.T) * S[None, :], S


def _mlp_weights(state: dict, layer: int, name: str) -> np.ndarray:
    return state[f"transformer.h.{layer}.{name}.weight"].detach().double().cpu().numpy()


def random_delta_sin_theta(Wb: np.ndarray, Ub_k: np.ndarray, frobenius: float, k: int, *, draws: int = 20,
                           seed: int = 0, center: bool = False) -> np.ndarray:
    """The control of the minimal-transformation claim: for ``draws`` Gaussian matrices R scaled to
    ‖R‖_F = ``frobenius`` (the fine-tune's ‖ΔW‖_F), the mean sin θ of the top-``k`` left singular
    directions of W_IT + R against W_IT's column space ``Ub_k``; returns [draws]."""
    rng = np.random.default_rng(seed)
    out = np.empty(draws)
    for i in range(draws):
        R = rng.standard_normal(Wb.shape)
        R *= frobenius / max(float(np.linalg.norm(R)), 1e-300)
        U, _, _, _ = _svd(Wb + R, center, rank=k)
        out[i] = float(sin_theta(Ub_k, U[:, :k]).mean())
    return out


def column_space(base_model, tuned_model, *, energy: float = 0.9, center: bool = False, max_k: int = 64,
                 control_draws: int = 20, seed: int = 0) -> dict:
    """Fig 4 for two lab models (IT = base, ST = tuned): per matrix kind and layer, sin θ of the top
    directions of W_ST and of ΔW against W_IT's top-k column space, with the chance level and, as the
    control of the minimal-transformation claim, ``random_delta``: the mean sin θ of W_IT + R for
    ``control_draws`` random R of ΔW's Frobenius norm (same k as W_ST; :func:`random_delta_sin_theta`)."""
    sb, st = base_model.state_dict(), tuned_model.state_dict()
    n_layer = base_model.config.n_layer
    out = {"energy": energy, "center": center, "layers": list(range(n_layer)), "matrices": {}}
    for name in MATRICES:
        out["matrices"][name] = [
            column_space_row(_mlp_weights(sb, layer, name), _mlp_weights(st, layer, name), energy=energy,
                             center=center, max_k=max_k, control_draws=control_draws,
                             seed=seed + 7919 * layer + (name == "c_proj"))
            for layer in range(n_layer)]
    return out


def column_space_row(Wb: np.ndarray, Wt: np.ndarray, *, energy: float = 0.9, center: bool = False, max_k: int = 64,
                     control_draws: int = 20, seed: int = 0) -> dict:
    """One matrix of :func:`column_space`: W_IT = ``Wb``, W_ST = ``Wt`` (float64 arrays [out, in])."""
    Wb, Wt = np.asarray(Wb, np.float64), np.asarray(Wt, np.float64)
    Ub, _, _, kb = _svd(Wb, center, energy=energy)
    kb = max(kb, 1)
    row = {"shape": list(Wb.shape), "k_base": kb, "chance": sin_theta_chance(Wb.shape[0], kb)}
    for label, M in (("tuned", Wt), ("delta", Wt - Wb)):
        U, S, _, k = _svd(M, center, energy=energy, max_rank=max_k)
        k = max(k, 1)  # a zero matrix: k 1 and no angles
        st_ = sin_theta(Ub[:, :kb], U[:, :k]) if np.any(S > 0) else np.zeros(0)
        row[label] = {"k": k, "sin_theta": st_.tolist(),
                      "mean_sin_theta": float(st_.mean()) if st_.size else float("nan"),
                      "frobenius": float(np.linalg.norm(M))}
    row["relative_change"] = row["delta"]["frobenius"] / max(float(np.linalg.norm(Wb)), 1e-300)
    if control_draws:
        draws = random_delta_sin_theta(Wb, Ub[:, :kb], row["delta"]["frobenius"], row["tuned"]["k"],
                                       draws=control_draws, seed=seed, center=center)
        row["random_delta"] = {"draws": control_draws, "seed": seed, "k": row["tuned"]["k"],
                               "mean_sin_theta": draws.tolist()}
    return row


def row_space(base_model, tuned_model, inputs: dict, *, hook: str = "mlp_in", positions: str = "eot",
              top: int = 15, center: bool = False, device="cpu", batch_size: int = 256, cache=None) -> dict:
    """Fig 5: inputs at the tuned model's ``hook`` (default the true MLP input, at EOT) scored on the right
    singular directions of W_IT, W_ST and ΔW (``c_fc``), for ``inputs`` = {"safe": [(x, start_idx), ...],
    "unsafe": [...]} (the lab's ``inputs.safe_unsafe_inputs``: the safe and unsafe variants of std_unsafe,
    paired by text, and of std_safe)."""
    from pysafe.analysis.clusters import features

    cap = dict(hook=hook, positions=positions, device=device, batch_size=batch_size, cache=cache)
    feats = {g: [features(tuned_model, x, s, **cap) for x, s in inputs[g]] for g in ("safe", "unsafe")}
    feats = {k: np.concatenate(v).astype(np.float64) for k, v in feats.items()}
    sb, st = base_model.state_dict(), tuned_model.state_dict()
    n_layer = base_model.config.n_layer
    out = {"hook": hook, "positions": positions, "top": top, "center": center, "layers": list(range(n_layer)),
           "weights": {}}
    for label in ("base", "tuned", "delta"):
        rows = []
        for layer in range(n_layer):
            Wb, Wt = _mlp_weights(sb, layer, "c_fc"), _mlp_weights(st, layer, "c_fc")
            W = {"base": Wb, "tuned": Wt, "delta": Wt - Wb}[label]
            row = {}
            for g, f in feats.items():
                score, S = row_scores(W, f[:, layer], center)  # [N, r]
                row["sigma"] = S[:top].tolist()
                mag = np.abs(score[:, :top])
                total = np.sqrt((score ** 2).sum(1)) / max(S[0], 1e-300)
                row[g] = {"abs_score_mean": mag.mean(0).tolist(), "abs_score_std": mag.std(0).tolist(),
                          "norm_ratio_mean": float(total.mean()), "norm_ratio_std": float(total.std()), "n": int(len(score))}
                if label == "delta":  # per input, for the claims' bootstrap (the i-th safe and unsafe share a text)
                    row[g]["norm_ratio"] = total.tolist()
            rows.append(row)
        out["weights"][label] = rows
    return out


def plot_column_space(result: dict, path, title: str = "") -> None:
    from pysafe._figures import OKABE_ITO, pyplot, save_figure

    plt = pyplot()

    mats = list(result["matrices"])
    n_layer = len(result["layers"])
    fig, axes = plt.subplots(len(mats), n_layer, figsize=(3.2 * n_layer, 2.8 * len(mats)), squeeze=False)
    for r, name in enumerate(mats):
        for layer, row in enumerate(result["matrices"][name]):
            ax = axes[r][layer]
            for label, color, marker in (("tuned", OKABE_ITO["blue"], "o"), ("delta", OKABE_ITO["vermillion"], "^")):
                y = row[label]["sin_theta"]
                ax.scatter(np.arange(1, len(y) + 1), y, s=9, color=color, marker=marker,
                           label="fine-tuned matrix W_ST" if label == "tuned" else "the change ΔW")
            ax.axhline(row["chance"], color="black", ls="--", lw=0.9, label="chance (random directions)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{name}, layer {layer} (W_IT's top k = {row['k_base']})", fontsize=8)
            ax.set_xlabel("singular direction", fontsize=7)
            if layer == 0:
                ax.set_ylabel("sin θ to W_IT's column space", fontsize=7)
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle((title + ": " if title else "") + "angle of the top left singular directions to W_IT's column "
                 "space (0: inside it)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path)


def plot_row_space(result: dict, path, title: str = "") -> None:
    from pysafe._figures import SAFE_COLOR, UNSAFE_COLOR, pyplot, save_figure

    plt = pyplot()

    labels = list(result["weights"])
    n_layer = len(result["layers"])
    fig, axes = plt.subplots(len(labels), n_layer, figsize=(3.2 * n_layer, 2.6 * len(labels)), squeeze=False)
    names = {"base": "W_IT", "tuned": "W_ST", "delta": "ΔW"}
    for r, label in enumerate(labels):
        for layer, row in enumerate(result["weights"][label]):
            ax = axes[r][layer]
            for g, color, ls in (("safe", SAFE_COLOR, "-"), ("unsafe", UNSAFE_COLOR, "--")):
                m, s = np.asarray(row[g]["abs_score_mean"]), np.asarray(row[g]["abs_score_std"])
                x = np.arange(1, len(m) + 1)
                ax.plot(x, m, color=color, ls=ls, label=f"{g} inputs (mean ± std)")
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.15, lw=0)
            ax.set_title(f"{names[label]}, layer {layer}", fontsize=8)
            ax.set_xlabel("direction j (by σ)", fontsize=7)
            if layer == 0:
                ax.set_ylabel("|σ_j ⟨â, v_j⟩|", fontsize=7)
    h, lab = axes[0][0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle((title + ": " if title else "") + "how strongly the inputs project on each matrix's top right "
                 f"singular directions ({result['hook']} at {result['positions']})", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure(fig, path)
