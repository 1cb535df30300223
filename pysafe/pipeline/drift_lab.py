"""Does the drift score predict lost refusals? Benign fine-tunes of an aligned lab model, measured.

``validate_drift(base, aligned, out)`` fine-tunes the aligned (safety-tuned) model on benign data only, in
several variants (:data:`VARIANTS`: learning rates, which texts, LoRA-style low-rank updates), evaluates how
many refusals each one lost on ``std_unsafe`` (and what it did to the jailbreak sets), computes each run's
drift against the alignment change (``pysafe.drift``) and two simple baselines, and tests, across the runs,
whether the drift score ranks the erosion: a Spearman correlation against a label-permutation control with
a bootstrap interval over runs, and the same against each baseline. The result may be negative; it is
reported as measured (``drift_validation.json``, ``claims.json``, a table).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from pysafe._atomic import write_json
from pysafe.analysis.claims import Claim, N_RESAMPLES, _nan_claim, bootstrap_replicates, percentile_interval
from pysafe.lab import ckpt as C
from pysafe.lab.data import DataRecipe
from pysafe.lab.evaluate import safety_table
from pysafe.pipeline.jobs import finished, parallel_train, read_json
from pysafe.pipeline.steps import checkpoint_info

#: the benign fine-tunes (name, options of ``pysafe train benign``); steps default to the preset's
#: [finetune.benign]. They span the ways a benign fine-tune can differ: rate, length, which texts (the
#: unsafe branch's texts share features with the refused requests), and full vs LoRA-style updates.
VARIANTS = (
    ("mix_lr3e-5", {"lr": 3e-5}),
    ("mix_lr1e-4", {"lr": 1e-4}),
    ("mix_lr3e-4", {"lr": 3e-4}),
    ("mix_lr1e-3", {"lr": 1e-3}),
    ("safe_branch_lr3e-4", {"lr": 3e-4, "texts": "safe_branch"}),
    ("unsafe_branch_lr1e-4", {"lr": 1e-4, "texts": "unsafe_branch"}),
    ("unsafe_branch_lr3e-4", {"lr": 3e-4, "texts": "unsafe_branch"}),
    ("lora4_mlp_lr1e-3", {"lr": 1e-3, "lora_rank": 4}),
    ("lora4_mlp_lr3e-3", {"lr": 3e-3, "lora_rank": 4}),
    ("lora16_all_lr1e-3", {"lr": 1e-3, "lora_rank": 16, "lora_targets": "all"}),
)
EVAL_SETS = ("std_safe", "std_unsafe")


def _train_args(name: str, opts: dict, aligned: Path, out: Path, preset: str, seed: int, device: str) -> list[str]:
    from pysafe.lab.config import stage_settings

    args = ["benign", "--preset", str(preset), "--seed", str(seed), "--init", str(aligned), "--out", str(out),
            "--device", device]
    if "lr" in opts:
        args += ["--lr", f"{opts['lr']:g}"]
    if "steps_factor" in opts:
        args += ["--steps", str(int(opts["steps_factor"]) * stage_settings(preset, "benign").train.steps)]
    for key in ("texts", "lora_rank", "lora_targets"):
        if key in opts:
            args += ["--" + key.replace("_", "-"), str(opts[key])]
    return args


def train_variants(aligned, out, *, preset: str = "cpu", seed: int = 0, device: str = "cpu", jobs: int = 1,
                   variants=None, invocation=None, log=print) -> list[Path]:
    """Fine-tune ``aligned`` in each variant (default :data:`VARIANTS`) under ``out/runs/<name>`` (finished
    runs are reused)."""
    variants = VARIANTS if variants is None else variants
    aligned, runs_dir = Path(aligned), Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    digest = checkpoint_info(aligned).get("sha256")
    stamp = runs_dir / "aligned.json"  # which aligned model the runs in runs_dir were trained from
    recorded = read_json(stamp).get("sha256")
    dirs, todo = [], []
    for name, opts in variants:
        d = runs_dir / name
        dirs.append(d)
        if recorded is not None and recorded != digest and (d / "config.json").exists():
            raise ValueError(f"{d}: a benign run (finished or to resume) trained from another {aligned.name} "
                             f"(model.safetensors sha256 {recorded[:12]}..., now {str(digest)[:12]}...); "
                             f"remove {runs_dir} to train the runs again from this one")
        if finished(d):
            log(f"{name}: finished earlier, reused")
        else:
            todo.append((d, _train_args(name, opts, aligned, d, preset, seed, device)))
    if recorded is None and len(todo) < len(dirs):
        log(f"{runs_dir}: runs from before pysafe recorded their aligned model, reused as they are "
            "(remove the folder if the aligned model changed since)")
    elif todo:
        write_json(stamp, {"aligned": str(aligned), "sha256": digest})
    if todo:
        parallel_train(todo, max(1, jobs), invocation, log)
    return dirs


def refusal_rates(ckpt, n: int, device: str = "cpu") -> dict:
    """The safety table of one checkpoint on :data:`EVAL_SETS` (``n`` samples each; no attack)."""
    model, cfg = C.load_checkpoint(ckpt)
    res = safety_table(model, DataRecipe.from_dict(cfg["data"]), sets=list(EVAL_SETS), n=n, device=device)
    return {"table": res["table"], "table_ci95": res["table_ci95"], "table_n": res["table_n"]}


# -- the weights side: baselines computed directly from the checkpoints -----------------------------------

def _matrices(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    w = load_file(str(Path(path) / "model.safetensors"))
    return {k: v.astype(np.float64) for k, v in w.items() if v.ndim == 2}


def baselines(base, aligned, tuned) -> dict:
    """Two scores that need no decomposition, over every 2-D weight: ‖ΔT‖_F / ‖W_aligned‖_F (how far the
    fine-tune moved) and the cosine between the flattened ΔT and ΔA (−1: straight back to the base)."""
    wb, wa, wt = _matrices(base), _matrices(aligned), _matrices(tuned)
    names = sorted(set(wb) & set(wa) & set(wt))
    dT = np.concatenate([(wt[k] - wa[k]).ravel() for k in names])
    dA = np.concatenate([(wa[k] - wb[k]).ravel() for k in names])
    wA = np.concatenate([wa[k].ravel() for k in names])
    nT, nA = float(np.linalg.norm(dT)), float(np.linalg.norm(dA))
    return {"rel_norm_T": nT / float(np.linalg.norm(wA)),
            "cos_TA": float(dT @ dA) / (nT * nA) if nT > 0 and nA > 0 else float("nan")}


# -- the statistics ------------------------------------------------------------------------------------

def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=-1)


def spearman(x, y) -> np.ndarray:
    """Spearman's ρ along the last axis (average ranks for ties; NaN when a side is constant)."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), np.nan)


def correlation_claim(text: str, score, erosion, *, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Claim:
    """ρ(score, erosion) across runs against its permutation null (erosion shuffled across runs): effect =
    ρ − mean null; interval: percentiles of (bootstrap-over-runs ρ − a null draw)."""
    s, e = np.asarray(score, np.float64), np.asarray(erosion, np.float64)
    rng = np.random.default_rng(seed)
    measured = float(spearman(s, e))
    if len(s) < 3 or not math.isfinite(measured):
        return _nan_claim(text, "label_permutation", ">", {"runs": int(len(s))},
                          "fewer than 3 runs, or a score or the erosion is the same for every run")
    boot = bootstrap_replicates([s, e], spearman, paired=True, n_resamples=n_resamples, rng=rng)
    perm = np.argsort(rng.random((n_resamples, len(e))), axis=1)
    null = spearman(np.broadcast_to(s, perm.shape), e[perm])
    boot, null = boot[np.isfinite(boot)], null[np.isfinite(null)]
    if len(boot) < n_resamples // 2 or len(null) < n_resamples // 2:
        return _nan_claim(text, "label_permutation", ">", {"runs": int(len(s))},
                          "most resamples of the runs give a constant score or erosion")
    control = float(null.mean())
    reps = boot - rng.choice(null, size=len(boot))
    return Claim(text, measured, control, "label_permutation", ">", measured - control, percentile_interval(reps),
                 {"runs": int(len(s))}, f"Spearman ρ over runs; bootstrap over runs ({n_resamples}) − permutation "
                 "null (erosion shuffled across runs); percentile interval")


def versus_baseline_claim(text: str, score, baseline, erosion, *, n_resamples: int = N_RESAMPLES,
                          seed: int = 0) -> Claim:
    """ρ(score, erosion) − ρ(baseline, erosion), both on the same bootstrap resamples of the runs."""
    s, b, e = (np.asarray(v, np.float64) for v in (score, baseline, erosion))
    measured, control = float(spearman(s, e)), float(spearman(b, e))
    if len(s) < 3 or not (math.isfinite(measured) and math.isfinite(control)):
        return _nan_claim(text, "baseline", ">", {"runs": int(len(s))},
                          "fewer than 3 runs, or a score or the erosion is the same for every run")

    def diff(s_, b_, e_):
        return spearman(s_, e_) - spearman(b_, e_)

    reps = bootstrap_replicates([s, b, e], diff, paired=True, n_resamples=n_resamples, rng=seed)
    reps = reps[np.isfinite(reps)]
    if len(reps) < n_resamples // 2:
        return _nan_claim(text, "baseline", ">", {"runs": int(len(s))},
                          "most resamples of the runs give a constant score or erosion")
    return Claim(text, measured, control, "baseline", ">", measured - control, percentile_interval(reps),
                 {"runs": int(len(s))}, f"difference of Spearman ρ on the same bootstrap resamples of the runs "
                 f"({n_resamples}); percentile interval")


# -- the whole validation ------------------------------------------------------------------------------

#: the drift summary's numbers tested as predictors (each its own claim), read by :func:`drift_scores`
SCORES = ("undo", "energy_both_ratio")


def drift_scores(base, aligned, tuned, memo=None) -> dict:
    """The whole-model drift numbers of one benign fine-tune that the validation tests (:data:`SCORES`; the
    intruder test, which they do not use, is skipped with its full SVDs). ``memo``: a
    :class:`pysafe.drift.AlignmentMemo` shared by the runs, so ΔA's decompositions are computed once."""
    from pysafe.drift import drift

    s = drift(base, aligned, tuned, intruder_k=0, memo=memo).summary["model"]
    return {k: float(s[k]) for k in SCORES}


def drift_claims(runs: list[dict], *, seed: int = 0) -> list[Claim]:
    """The validation's claims from its per-run rows (``drift_validation.json["runs"]``: each with
    ``erosion``, ``drift`` and ``baselines``): for each score of :data:`SCORES`, its correlation with the
    erosion against the permutation control, and its gain over each baseline."""
    erosion = [r["erosion"] for r in runs]
    claims = []
    for key in SCORES:
        score = [r["drift"][key] for r in runs]
        claims.append(correlation_claim(f"the drift score {key} ranks the refusals a benign fine-tune erodes "
                                        f"(Spearman ρ over {len(runs)} runs)", score, erosion, seed=seed))
        for bkey, sign in (("rel_norm_T", 1.0), ("cos_TA", -1.0)):
            base_score = [sign * r["baselines"][bkey] for r in runs]
            claims.append(versus_baseline_claim(
                f"{key} ranks the erosion better than {'' if sign > 0 else '−'}{bkey}", score, base_score, erosion,
                seed=seed))
    return claims


def validate_drift(base, aligned, out, *, preset: str = "cpu", n: int = 500, seed: int = 0, device: str = "cpu",
                   jobs: int = 1, variants=None, invocation=None, log=print) -> dict:
    """Train the benign variants, evaluate them and the aligned model, score their drift, test the scores.

    Writes ``out/drift_validation.json`` (per run: options, refusal rates with intervals, erosion, drift
    numbers, baselines; the claims) and ``out/claims.json``; returns the former's content."""
    out = Path(out)
    variants = VARIANTS if variants is None else variants
    t0 = time.perf_counter()
    dirs = train_variants(aligned, out, preset=preset, seed=seed, device=device, jobs=jobs, variants=variants,
                          invocation=invocation, log=log)
    ref = refusal_rates(aligned, n, device)
    log(f"aligned model: refuses {100 * ref['table']['unsafe_refuse']:.1f}% of std_unsafe ({n} samples)")
    from pysafe.drift import AlignmentMemo

    runs, memo = [], AlignmentMemo()
    for (name, opts), d in zip(variants, dirs):
        rates = refusal_rates(d, n, device)
        row = {"name": name, "options": opts, "checkpoint": str(d), **rates,
               "erosion": ref["table"]["unsafe_refuse"] - rates["table"]["unsafe_refuse"],
               "drift": drift_scores(base, aligned, d, memo), "baselines": baselines(base, aligned, d)}
        runs.append(row)
        log(f"{name}: refuses {100 * rates['table']['unsafe_refuse']:.1f}% (erosion {100 * row['erosion']:+.1f} "
            f"points), drift {', '.join(f'{k} {v:.3g}' for k, v in row['drift'].items())}")
    claims = drift_claims(runs, seed=seed)
    result = {"command": invocation, "base": str(base), "aligned": str(aligned), "preset": preset, "seed": seed,
              "n_per_set": n,
              "aligned_rates": ref, "runs": runs, "claims": [c.to_json() for c in claims],
              "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / "drift_validation.json", result)
    write_json(out / "claims.json", result["claims"])
    return result
