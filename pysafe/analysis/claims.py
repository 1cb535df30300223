"""The paper's mechanistic claims as tested statements: an effect, a control that can fail, a bootstrap
95% interval and a verdict (docs/claims.md).

Every claim is a statistic of per-input (or per-direction) values, compared with a control:

- ``effect`` = ``measured`` − ``control``;
- ``ci95``: the 2.5 and 97.5 percentiles of the effect's replicates. Replicates resample the inputs
  (each group independently, or jointly where the values are paired by input); where the control is a
  chance distribution (a label permutation, random weight changes) each replicate also draws one value
  from that distribution, so the interval holds both the sampling error and the chance spread;
- ``holds``: the whole interval lies on the claimed side of 0 (``side`` ">" or "<"), farther from it than
  floating-point rounding; an interval that touches 0, or a statistic that could not be computed (NaN),
  does not hold.

The resampling is plain NumPy (a percentile bootstrap and a Monte Carlo permutation null); the tests
check both against ``scipy.stats.bootstrap`` / ``scipy.stats.permutation_test`` and check the interval's
coverage by a seeded Monte Carlo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

N_RESAMPLES = 2000
CONFIDENCE = 0.95
ROUNDING = 1e-12  # an interval within this (relative) distance of 0 is rounding, not an effect
SIDES = (">", "<")
CONTROL_KINDS = ("pretrained", "lower_rate", "lower_budget", "label_permutation", "random_delta", "baseline", "none")


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Claim:
    """One claim's verdict; :meth:`to_json` gives the claims.json entry."""

    claim: str
    measured: float
    control: float | None
    control_kind: str
    side: str  # ">": the claim says effect > 0; "<": effect < 0
    effect: float
    ci95: tuple[float, float]
    n: dict = field(default_factory=dict)  # resampled units per group (inputs, or singular directions)
    method: str = ""

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"Claim.side must be one of {SIDES}, got {self.side!r}")
        if self.control_kind not in CONTROL_KINDS:
            raise ValueError(f"Claim.control_kind must be one of {CONTROL_KINDS}, got {self.control_kind!r}")

    @property
    def holds(self) -> bool:
        """The interval lies on the claimed side of 0, beyond rounding (ROUNDING × the statistic's scale)."""
        lo, hi = self.ci95
        if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(self.effect)):
            return False
        tol = ROUNDING * max(1.0, abs(self.measured), abs(self.control or 0.0))
        return lo > tol if self.side == ">" else hi < -tol

    def to_json(self) -> dict:
        """Strict JSON (NaN and infinities become null)."""
        return {"claim": self.claim, "measured": _finite(self.measured),
                "control": None if self.control is None else _finite(self.control), "holds": self.holds,
                "effect": _finite(self.effect), "ci95": [_finite(self.ci95[0]), _finite(self.ci95[1])],
                "side": self.side, "control_kind": self.control_kind, "n": dict(self.n), "method": self.method}


# -- resampling -------------------------------------------------------------------------------------------

def _arrays(samples) -> list[np.ndarray]:
    return [np.asarray(s, np.float64).ravel() for s in samples]


def bootstrap_replicates(samples, statistic, *, paired: bool = False, n_resamples: int = N_RESAMPLES,
                         rng=None) -> np.ndarray:
    """``n_resamples`` values of ``statistic(*resampled)``: each sample is drawn with replacement (all with
    the same indices when ``paired``); a sample of one value is held fixed. ``statistic`` reduces over the
    last axis (it is called with [n_resamples, n_i] arrays)."""
    rng = np.random.default_rng(rng)
    xs = _arrays(samples)
    if paired:
        n = len(xs[0])
        if any(len(x) != n for x in xs):
            raise ValueError(f"paired samples need one length, got {[len(x) for x in xs]}")
        idx = rng.integers(0, n, (n_resamples, n))
        return np.asarray(statistic(*(x[idx] for x in xs)), np.float64)
    res = [x[rng.integers(0, len(x), (n_resamples, len(x)))] if len(x) > 1 else np.broadcast_to(x, (n_resamples, len(x)))
           for x in xs]
    return np.asarray(statistic(*res), np.float64)


def permutation_null(samples, statistic, *, paired: bool = False, n_resamples: int = N_RESAMPLES,
                     rng=None) -> np.ndarray:
    """``statistic`` under random reassignment of the labels: the pooled values shuffled among the samples
    (sizes kept), or, when ``paired`` (two samples of one length), the two values of each pair swapped with
    probability 1/2."""
    rng = np.random.default_rng(rng)
    xs = _arrays(samples)
    if paired:
        if len(xs) != 2 or len(xs[0]) != len(xs[1]):
            raise ValueError("a paired permutation needs two samples of one length")
        flip = rng.random((n_resamples, len(xs[0]))) < 0.5
        a, b = xs
        return np.asarray(statistic(np.where(flip, b, a), np.where(flip, a, b)), np.float64)
    pooled = np.concatenate(xs)
    perm = np.argsort(rng.random((n_resamples, len(pooled))), axis=1)
    shuffled = pooled[perm]
    cuts = np.cumsum([len(x) for x in xs])[:-1]
    return np.asarray(statistic(*np.split(shuffled, cuts, axis=1)), np.float64)


def percentile_interval(replicates, confidence: float = CONFIDENCE) -> tuple[float, float]:
    r = np.asarray(replicates, np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)):
        return (float("nan"), float("nan"))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(r, [a, 1 - a])
    return (float(lo), float(hi))


def _nan_claim(text, kind, side, n, why) -> Claim:
    return Claim(text, float("nan"), None if kind == "none" else float("nan"), kind, side, float("nan"),
                 (float("nan"), float("nan")), n, f"not computed: {why}")


def _sizes(names, samples) -> dict:
    return {k: int(np.size(s)) for k, s in zip(names, samples)}


def _usable(samples, minimum: int = 2) -> bool:
    return all(np.size(s) >= minimum and np.all(np.isfinite(np.asarray(s, np.float64))) for s in samples)


# -- claim shapes -----------------------------------------------------------------------------------------

def vs_permutation(text: str, names, samples, statistic, *, side: str = ">", paired: bool = False,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> Claim:
    """A statistic of labelled groups against the same statistic after shuffling the labels: effect =
    measured − mean of the permutation null; replicates = bootstrap replicate − a null draw."""
    samples = _arrays(samples)
    n = _sizes(names, samples)
    if not _usable(samples):
        return _nan_claim(text, "label_permutation", side, n, "a group has fewer than 2 finite values")
    rng = np.random.default_rng(seed)
    measured = float(statistic(*samples))
    boot = bootstrap_replicates(samples, statistic, paired=paired, n_resamples=n_resamples, rng=rng)
    null = permutation_null(samples, statistic, paired=paired, n_resamples=n_resamples, rng=rng)
    control = float(null.mean())
    reps = boot - rng.permutation(null)
    how = "paired bootstrap; sign-flip permutation" if paired else "bootstrap per group; label permutation"
    return Claim(text, measured, control, "label_permutation", side, measured - control, percentile_interval(reps), n,
                 f"{how}, {n_resamples} resamples, percentile interval of bootstrap − null")


def vs_control_samples(text: str, names, measured_samples, control_samples, statistic, *, kind: str, side: str,
                       paired: bool = False, n_resamples: int = N_RESAMPLES, seed: int = 0) -> Claim:
    """``statistic`` of the measured samples against the same statistic of control samples (the pretrained
    model or the lower learning rate / budget on the same inputs, or draws of a random control). When
    ``paired`` the i-th values of every measured and control sample belong to one input and are resampled
    together; otherwise each sample is resampled on its own."""
    m, c = _arrays(measured_samples), _arrays(control_samples)
    n = _sizes(names, m)
    if not _usable(m + c, 1) or not _usable(m):
        return _nan_claim(text, kind, side, n, "a group has too few finite values")
    measured, control = float(statistic(*m)), float(statistic(*c))
    k = len(m)

    def diff(*xs):
        return statistic(*xs[:k]) - statistic(*xs[k:])

    reps = bootstrap_replicates(m + c, diff, paired=paired, n_resamples=n_resamples, rng=seed)
    how = "paired bootstrap over inputs" if paired else "bootstrap per group"
    return Claim(text, measured, control, kind, side, measured - control, percentile_interval(reps), n,
                 f"{how}, {n_resamples} resamples, percentile interval")


def mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_mean_diff(a, b, axis=-1):
    return np.mean(np.asarray(a) - np.asarray(b), axis=axis)


# -- the lab's claims -------------------------------------------------------------------------------------

SAFE, UNSAFE = "std_safe", "std_unsafe"  # the clusters.json groups the separation is measured between
ADV, ADV_SWEEP = "adv_soft_tokens", "adv_soft_tokens_eps"  # the attacked group; the swept budgets' prefix


# -- what the claims read, typed ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterValues:
    """What the activation-space claims read of one model's Fig 3 result (``cluster_analysis``): each group's
    last-layer τ, one value per input, in input order."""

    tau_last: dict[str, np.ndarray]

    @classmethod
    def of(cls, result: dict | None) -> ClusterValues:
        """From a ``cluster_analysis`` result (or clusters.json); groups without per-input τ are left out."""
        groups = (result or {}).get("groups", {})
        return cls({g: np.asarray(row["tau_last"], np.float64) for g, row in groups.items() if "tau_last" in row})

    def tau(self, group: str) -> np.ndarray | None:
        return self.tau_last.get(group)

    @property
    def jailbreaks(self) -> dict[str, np.ndarray]:
        """The jailbreak groups (``jb_*``) with at least 2 inputs."""
        return {g: v for g, v in self.tau_last.items() if g.startswith("jb_") and len(v) >= 2}

    @property
    def budgets(self) -> list[float]:
        """The attack budgets of the swept groups ``adv_soft_tokens_eps<f>`` (budget 1 has the plain name)."""
        return [float(g[len(ADV_SWEEP):]) for g in self.tau_last if g.startswith(ADV_SWEEP)]


@dataclass(frozen=True)
class FigureValues:
    """What the claims of Figs 4-6 read of one model's results, at the last layer (c_fc); arrays are empty where
    the model has no such result (the pretrained model has no column or row space of its own)."""

    directions: np.ndarray       # sin θ of W_ST's top left singular directions against W_IT's column space
    random_draws: np.ndarray     # the control: mean sin θ of W_IT + a random ΔW of the same norm, per draw
    reads_unsafe: np.ndarray     # ‖ΔW â‖/σ1 per input, unsafe variant
    reads_safe: np.ndarray       # the same, safe variant (the i-th of each share a text)
    lipschitz_safe: np.ndarray   # gradient-norm Lipschitz estimate per input, safe inputs
    lipschitz_unsafe: np.ndarray

    @classmethod
    def of(cls, fig: dict) -> FigureValues:
        """From ``{"colspace", "rowspace", "lipschitz"}`` results (the JSON of figures/<name>/)."""
        def arr(v):
            return np.asarray(v if v is not None else [], np.float64)

        col = fig.get("colspace", {}).get("matrices", {}).get("c_fc", [{}])[-1] if "colspace" in fig else {}
        row = fig["rowspace"]["weights"]["delta"][-1] if "rowspace" in fig else {}
        lip = fig.get("lipschitz", {}).get("estimates", {}).get("grad", {})
        return cls(directions=arr(col.get("tuned", {}).get("sin_theta")),
                   random_draws=arr((col.get("random_delta") or {}).get("mean_sin_theta")),
                   reads_unsafe=arr(row.get("unsafe", {}).get("norm_ratio")),
                   reads_safe=arr(row.get("safe", {}).get("norm_ratio")),
                   lipschitz_safe=arr(lip.get("safe", {}).get("values")),
                   lipschitz_unsafe=arr(lip.get("unsafe", {}).get("values")))


def _missing(*xs) -> bool:
    return any(x is None for x in xs)


def _same_length(*xs) -> bool:
    return len({len(x) for x in xs}) == 1


def separation_vs_model(text: str, tuned: ClusterValues, control: ClusterValues, kind: str, seed: int = 0) -> Claim:
    """τ(std_safe) − τ(std_unsafe) at the last layer of ``tuned`` against the same of ``control`` (the same
    inputs through another model: per-input pairs are resampled together)."""
    vals = [tuned.tau(SAFE), tuned.tau(UNSAFE), control.tau(SAFE), control.tau(UNSAFE)]
    if _missing(*vals):
        return _nan_claim(text, kind, ">", {}, f"per-input τ of {SAFE}/{UNSAFE} missing")
    return vs_control_samples(text, (SAFE, UNSAFE), vals[:2], vals[2:], mean_diff, kind=kind, side=">",
                              paired=_same_length(*vals), seed=seed)


def cluster_claims(res: dict, weaker: dict | None = None, *, n_resamples: int = N_RESAMPLES) -> list[Claim]:
    """The activation-space claims (Figs 3 and 7) at the last layer from ``{name: cluster_analysis()}``;
    ``res`` must hold "pretrained"; ``weaker`` maps a fine-tune to the same method at the lower rate."""
    weaker = weaker or {}
    kw = dict(n_resamples=n_resamples)
    claims = []
    vals = {name: ClusterValues.of(r) for name, r in res.items()}
    tuned = [k for k in res if k != "pretrained" and k not in weaker.values()]
    for k in tuned:
        claims.append(separation_vs_model(
            f"std_safe and std_unsafe inputs separate more after {k} than before (τ_safe − τ_unsafe, last layer; "
            f"control = the pretrained model on the same inputs)", vals[k], vals["pretrained"], "pretrained"))
        s, u = vals[k].tau(SAFE), vals[k].tau(UNSAFE)
        text = (f"std_safe and std_unsafe inputs form separate clusters after {k} (τ_safe − τ_unsafe, last layer; "
                f"control = the same inputs with the safe/unsafe labels shuffled)")
        claims.append(_nan_claim(text, "label_permutation", ">", {}, "per-input τ missing") if _missing(s, u) else
                      vs_permutation(text, (SAFE, UNSAFE), (s, u), mean_diff, **kw))
    for k, w in weaker.items():
        if k in res and w in res:
            claims.append(separation_vs_model(f"the separation grows with fine-tuning strength: {k} vs {w} (the lower "
                                              f"rate; τ_safe − τ_unsafe, last layer, same inputs)", vals[k], vals[w],
                                              "lower_rate"))
    for k in tuned:
        v = vals[k]
        unsafe = v.tau(UNSAFE)
        jb = v.jailbreaks
        text = (f"jailbreak inputs sit closer to the safe cluster than std_unsafe inputs do ({k}: mean over {len(jb)} "
                f"jailbreak sets of τ_jb − τ_unsafe, last layer; control = jailbreak/unsafe labels shuffled)")
        if unsafe is None or not jb:
            claims.append(_nan_claim(text, "label_permutation", ">", {}, "no jailbreak or std_unsafe τ"))
        else:
            def jb_shift(*xs):
                return np.mean([np.mean(x, axis=-1) for x in xs[:-1]], axis=0) - np.mean(xs[-1], axis=-1)

            claims.append(vs_permutation(text, (*jb, UNSAFE), (*jb.values(), unsafe), jb_shift, **kw))
        adv = v.tau(ADV)
        if adv is not None:
            text = (f"adversarially attacked inputs move toward the safe cluster ({k}: τ_adv − τ_unsafe, last layer; "
                    f"control = adv/unsafe labels shuffled)")
            claims.append(_nan_claim(text, "label_permutation", ">", {}, "no std_unsafe τ") if unsafe is None else
                          vs_permutation(text, (ADV, UNSAFE), (adv, unsafe), mean_diff, **kw))
        budgets = v.budgets
        if len(set(budgets)) >= 2:
            lo_g, hi_g = f"{ADV_SWEEP}{min(budgets):g}", f"{ADV_SWEEP}{max(budgets):g}"
            lo, hi = v.tau(lo_g), v.tau(hi_g)
            claims.append(vs_control_samples(
                f"the shift toward safe grows with the attack budget ({k}: τ_adv at {max(budgets):g}× the letter "
                f"norm; control = at {min(budgets):g}× on the same inputs)", (hi_g,), (hi,), (lo,),
                lambda x: np.mean(x, axis=-1), kind="lower_budget", side=">", paired=_same_length(hi, lo), **kw))
    return claims


def figure_claims(figs: dict, weaker: dict | None = None, *, n_resamples: int = N_RESAMPLES) -> list[Claim]:
    """The claims of Figs 4-6 from ``{name: {"colspace", "rowspace", "lipschitz"}}`` (last layer, c_fc)."""
    weaker = weaker or {}
    kw = dict(n_resamples=n_resamples)
    claims = []
    tuned = [k for k in figs if k != "pretrained" and k not in weaker.values()]
    base = FigureValues.of(figs["pretrained"])
    for k in tuned:
        f = FigureValues.of(figs[k])
        dirs, draws = f.directions, f.random_draws
        text = (f"{k} is a minimal transformation: W_ST's top left singular directions stay in W_IT's column space "
                f"(mean sin θ, c_fc, last layer; control = W_IT + a random ΔW of the same Frobenius norm)")
        if dirs.size == 0 or draws.size == 0:
            claims.append(_nan_claim(text, "random_delta", "<", {}, "no directions or no random draws"))
        else:
            c = vs_control_samples(text, ("directions",), (dirs,), (draws,), lambda x: np.mean(x, axis=-1),
                                   kind="random_delta", side="<", **kw)
            c.n["random_draws"] = int(draws.size)
            claims.append(c)
        u, s = f.reads_unsafe, f.reads_safe
        text = (f"ΔW reads unsafe inputs more than safe ones ({k}: ‖ΔW â‖/σ1 at mlp_in, EOT, last layer, unsafe − safe "
                f"variant of the same text; control = the safe/unsafe labels permuted)")
        claims.append(vs_permutation(text, ("unsafe", "safe"), (u, s), paired_mean_diff if _same_length(u, s) else mean_diff,
                                     paired=_same_length(u, s), **kw) if u.size and s.size else
                      _nan_claim(text, "label_permutation", ">", {}, "per-input ‖ΔW â‖ missing"))
        vals = [f.lipschitz_safe, f.lipschitz_unsafe, base.lipschitz_safe, base.lipschitz_unsafe]
        text = (f"local Lipschitzness drops on unsafe inputs after {k} (median gradient norm, unsafe / safe; "
                f"control = the pretrained model's ratio on the same inputs)")
        claims.append(vs_control_samples(text, ("safe", "unsafe"), vals[:2], vals[2:],
                                         lambda a, b: np.median(b, axis=-1) / np.median(a, axis=-1),
                                         kind="pretrained", side="<", paired=_same_length(*vals), **kw)
                      if all(v.size for v in vals) else _nan_claim(text, "pretrained", "<", {}, "per-input estimates missing"))
    return claims


def format_claims(claims, title: str = "activation analyses") -> str:
    """One line per claim: verdict, statement, effect and its 95% interval (``Claim`` or claims.json dicts)."""
    def num(v):
        return "nan" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"

    lines = [f"claims ({title}; effect = measured − control, 95% bootstrap interval; holds = the "
             "interval lies on the claimed side of 0):"]
    for c in claims:
        d = c.to_json() if isinstance(c, Claim) else c
        if "ci95" in d:
            lo, hi = d["ci95"]
            tail = (f": effect {num(d.get('effect'))} [{num(lo)}, {num(hi)}], claimed {d.get('side', '>')} 0 "
                    f"(measured {num(d['measured'])}, control {num(d['control'])})")
        else:  # a claims.json from before the intervals
            ctl = "" if d["control"] is None else f" (control {num(d['control'])})"
            tail = f": {num(d['measured'])}{ctl}"
        lines.append(f"  [{'holds' if d['holds'] else 'fails'}] {d['claim']}{tail}")
    return "\n".join(lines)
