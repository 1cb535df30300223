"""Fig 6: local Lipschitzness of a lab model on safe and unsafe inputs (docs/analyses.md, fixes L1-L4).

Two estimates per prompt, both with respect to the token embeddings E of the prompt positions 0..s−1
(BOS, operators, SOT, text; positions are added by the model and not perturbed):

- ``grad``: L̂ = ‖∂ z*/∂E‖_F with z* = max_v logits[s, v], the top raw logit at EOT (the reference's
  statistic, named precisely);
- ``fd``: a finite-difference estimate, max over K Gaussian perturbations δ of radius r·‖E‖_F of
  ‖logits[s](E + δ) − logits[s](E)‖₂ / ‖δ‖_F.

Histograms use shared bins (L4); summaries are the medians and the AUROC of each estimate separating safe
from unsafe prompts (P(L̂_safe > L̂_unsafe)).
"""

from __future__ import annotations

import numpy as np
import torch

from pysafe.analysis.clusters import auroc
from pysafe.lab.model import eval_mode


def _prompt_embeddings(model, x: np.ndarray, s: np.ndarray, device):
    T = int(s.max()) + 1
    ids = torch.from_numpy(x[:, :T].astype(np.int64)).to(device)
    E = model.transformer.wte(ids).detach()
    pos = torch.arange(T, device=device)[None, :]
    mask = (pos < torch.from_numpy(s).to(device)[:, None]).to(E.dtype)[..., None]  # rows 0..s-1
    return ids, E, mask


def lipschitz_estimates(model, x, start_idx, *, fd_samples: int = 8, fd_radius: float = 1e-2, seed: int = 0,
                        batch_size: int = 128, device="cpu") -> dict:
    """Per-sample ``grad`` and ``fd`` estimates (float64 arrays [N]) for prompts x[:, :s+1]."""
    x = np.asarray(x)
    s_all = np.asarray(start_idx, dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    grads, fds = [], []
    with eval_mode(model, frozen=True):
        for lo in range(0, len(s_all), batch_size):
            sl = slice(lo, lo + batch_size)
            s = s_all[sl]
            ids, E, mask = _prompt_embeddings(model, x[sl], s, device)
            rows = torch.arange(len(s), device=device)
            st = torch.from_numpy(s).to(device)
            key_pad = ids == 20
            with torch.enable_grad():
                Eg = E.clone().requires_grad_(True)
                logits = model(inputs_embeds=Eg, key_pad=key_pad)
                z = logits[rows, st].max(-1).values
                (g,) = torch.autograd.grad(z.sum(), Eg)  # samples are independent: row b holds ∂z_b/∂E_b
            grads.append((g * mask).flatten(1).norm(dim=1).double().cpu().numpy())
            with torch.no_grad():
                base = model(inputs_embeds=E, key_pad=key_pad)[rows, st]
                scale = (E * mask).flatten(1).norm(dim=1)
                best = torch.zeros(len(s), dtype=torch.float64, device=device)
                for _ in range(fd_samples):
                    d = torch.randn(E.shape, generator=gen).to(device, E.dtype) * mask
                    d = d * (fd_radius * scale / d.flatten(1).norm(dim=1).clamp_min(1e-30))[:, None, None]
                    out = model(inputs_embeds=E + d, key_pad=key_pad)[rows, st]
                    ratio = (out - base).norm(dim=-1).double() / d.flatten(1).norm(dim=1).double().clamp_min(1e-300)
                    best = torch.maximum(best, ratio)
            fds.append(best.cpu().numpy())
    return {"grad": np.concatenate(grads) if grads else np.zeros(0),
            "fd": np.concatenate(fds) if fds else np.zeros(0)}


def lipschitz_analysis(model, inputs: dict, *, fd_samples: int = 8, fd_radius: float = 1e-2, bins: int = 30,
                       device="cpu") -> dict:
    """Fig 6 on ``inputs`` = {"safe": [(x, start_idx), ...], "unsafe": [...]} (the lab's
    ``inputs.safe_unsafe_inputs``): JSON-ready, with shared-bin histograms and the per-input estimates,
    ``values``, in input order (the i-th safe and unsafe values share a text when the inputs are paired)."""
    est = {g: {"grad": [], "fd": []} for g in ("safe", "unsafe")}
    for g in ("safe", "unsafe"):
        for x, s in inputs[g]:
            e = lipschitz_estimates(model, x, s, fd_samples=fd_samples, fd_radius=fd_radius, device=device)
            for k in ("grad", "fd"):
                est[g][k].append(e[k])
    out = {"fd_samples": fd_samples, "fd_radius": fd_radius, "estimates": {}}
    for k in ("grad", "fd"):
        safe = np.concatenate(est["safe"][k])
        unsafe = np.concatenate(est["unsafe"][k])
        edges = np.histogram_bin_edges(np.concatenate([safe, unsafe]), bins=bins)
        out["estimates"][k] = {
            "bins": edges.tolist(),
            "safe": {"n": int(len(safe)), "median": float(np.median(safe)), "mean": float(safe.mean()),
                     "density": np.histogram(safe, edges, density=True)[0].tolist(), "values": safe.tolist()},
            "unsafe": {"n": int(len(unsafe)), "median": float(np.median(unsafe)), "mean": float(unsafe.mean()),
                       "density": np.histogram(unsafe, edges, density=True)[0].tolist(), "values": unsafe.tolist()},
            "auroc_safe_gt_unsafe": auroc(safe, unsafe),
            "median_ratio_unsafe_to_safe": float(np.median(unsafe) / max(np.median(safe), 1e-300)),
        }
    return out


def plot_lipschitz(result: dict, path, title: str = "") -> None:
    from pysafe._figures import SAFE_COLOR, UNSAFE_COLOR, pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9))
    names = {"grad": "‖∂ max-logit / ∂E‖_F", "fd": "finite difference ‖Δlogits‖/‖δ‖"}
    for ax, (k, r) in zip(axes, result["estimates"].items()):
        edges = np.asarray(r["bins"])
        for g, color, hatch in (("safe", SAFE_COLOR, None), ("unsafe", UNSAFE_COLOR, "//")):
            ax.stairs(r[g]["density"], edges, fill=True, alpha=0.4, color=color, hatch=hatch,
                      label=f"{g} prompts (median {r[g]['median']:.3g})")
            ax.stairs(r[g]["density"], edges, color=color, lw=1.2)
        ax.set_xlabel(names[k], fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.set_title(f"AUROC(safe > unsafe) = {r['auroc_safe_gt_unsafe']:.2f}", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.2), frameon=False)
    fig.suptitle((title + ": " if title else "") + "how much the output moves per unit change of the prompt "
                 "(lower: less sensitive)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
