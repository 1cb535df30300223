"""drift(): does a further fine-tune undo, overlap or leave alone the safety alignment of a model?

Three checkpoints of one architecture: BASE, ALIGNED (its safety-tuned version) and TUNED (a fine-tune of
ALIGNED, a full checkpoint or a PEFT LoRA adapter on ALIGNED). Per 2-D matrix, the alignment change
ΔA = W_aligned − W_base and the new change ΔT = W_tuned − W_aligned are compared: how much of ΔT's energy
lies in ΔA's top singular subspace, how much of ΔA it cancels, the angles between their top subspaces and
the intruder dimensions of W_tuned against W_aligned (docs/drift.md). Every number comes with the value a
random ΔT of the same shape would give, and the whole-model aggregates with a bootstrap interval over
matrices.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from pysafe._loader import _core
from pysafe.backend import engine_device
from pysafe.checkpoint import Checkpoint, PeftAdapter, detect_scheme, name_info
from pysafe.errors import CheckpointError, ShapeMismatchError, TensorNotFoundError, printable
from pysafe.linalg import sin_theta, sin_theta_chance, truncated_svd

#: bootstrap settings of the whole-model intervals (resamples over matrices, seed)
N_BOOT, BOOT_SEED = 2000, 0

#: aggregated metrics: name -> (numerator column, denominator column, chance-numerator column or None)
AGGREGATES = {
    "energy_left": ("e_left", "tt", "c_left"),
    "energy_right": ("e_right", "tt", "c_right"),
    "energy_both": ("e_both", "tt", "c_both"),
    "undo": ("neg_inner", "aa", None),
    "undo_topk": ("neg_inner_k", "aa_k", None),
    "sin_theta_left": ("sin_left_sum", "k_T", "c_sin_left"),
    "sin_theta_right": ("sin_right_sum", "k_T", "c_sin_right"),
    "intruders": ("intr", "intr_k", None),
    "intruders_alignment": ("intr_ctl", "intr_k", None),
}
_COLUMNS = ("e_left", "e_right", "e_both", "tt", "c_left", "c_right", "c_both", "neg_inner", "aa", "neg_inner_k",
            "aa_k", "sin_left_sum", "sin_right_sum", "k_T", "c_sin_left", "c_sin_right", "intr", "intr_ctl",
            "intr_k", "tt_aa_mn")


@dataclass
class DriftResult:
    """Result of :func:`drift`: one record per matrix, the whole-model summary and what was skipped."""

    base: dict
    aligned: dict
    tuned: dict
    params: dict
    records: list[dict]
    summary: dict
    skipped: list[dict] = field(default_factory=list)
    scheme: str = "unknown"
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (f"DriftResult({len(self.records)} matrices, {len(self.skipped)} skipped, scheme={self.scheme!r}, "
                f"{self.seconds:.1f} s)")

    def record(self, name: str) -> dict:
        """The record of matrix ``name``; KeyError (naming the nearest names) if it was not analysed."""
        for r in self.records:
            if r["name"] == name:
                return r
        import difflib

        near = difflib.get_close_matches(name, [r["name"] for r in self.records], n=3, cutoff=0.5)
        raise KeyError(f"no drift record for tensor {name!r}" + (f"; did you mean {', '.join(map(repr, near))}?"
                                                                  if near else ""))

    def to_pandas(self):
        """The records as a pandas DataFrame, one row per matrix (list-valued keys left out). Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError('DriftResult.to_pandas() needs pandas, which is not installed: '
                              'pip install "pysafe[pandas]" (or pip install pandas)') from None
        return pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, list)} for r in self.records])


class AlignmentMemo:
    """What :func:`drift` computes from BASE and ALIGNED alone, kept across calls that share them.

    ``pysafe track --aligned`` and ``validate-drift`` measure many TUNED checkpoints against one BASE and
    ALIGNED; per matrix, ΔA's top singular subspace and the intruder control (W_aligned's top left vectors
    against W_base's) do not depend on TUNED, and neither do W_aligned's left singular vectors, which the
    intruder test reads. Pass one memo to every such call (``drift(..., memo=m)``): the first computes and
    keeps them, the others reuse them, with identical records. W_aligned's vectors are kept while the memo
    holds at most ``max_bytes`` of them (all of them for the lab's models; for a 7B model they are
    recomputed). A memo belongs to one BASE, ALIGNED and set of options: using it with others raises a
    ValueError.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self.key = None
        self.entries: dict[str, dict] = {}
        self.bytes = 0
        self.hits = 0

    def _bind(self, key) -> None:
        if self.key is None:
            self.key = key
        elif self.key != key:
            raise ValueError("this AlignmentMemo was filled for another BASE, ALIGNED or other drift options; "
                             "use one memo per BASE, ALIGNED and set of options")

    def _keep_vectors(self, U: np.ndarray) -> bool:
        if self.bytes + U.nbytes > self.max_bytes:
            return False
        self.bytes += U.nbytes
        return True


def drift(base, aligned, tuned, *, k: int | None = None, energy: float = 0.9, max_rank: int | None = None,
          tol: float = 1e-4, exact: bool = False, intruder_k: int = 10, intruder_eps: float = 0.5,
          include: str | None = None, device: str = "cpu", progress=None, on_pairs=None,
          memo: AlignmentMemo | None = None) -> DriftResult:
    """Measure, per matrix, how the change TUNED − ALIGNED relates to the alignment change ALIGNED − BASE.

    Args:
        base, aligned: paths (or opened :class:`Checkpoint`) of the base model and its aligned version.
        tuned: path (or opened checkpoint / :class:`PeftAdapter` on ALIGNED) of the further fine-tune.
        k: fixed rank of ΔA's and ΔT's top subspaces; None: the smallest k holding ``energy`` of ‖·‖²_F.
        energy: energy fraction of the rank rule (0, 1].
        max_rank: cap on k under the energy rule (None: no cap).
        tol: relative error allowed on the singular values (the engine's SVD setting): each SVD gets the
            engine's cheapest algorithm that meets it.
        exact: force exact (LAPACK) SVDs everywhere.
        intruder_k: how many top left singular vectors of W_tuned are tested for intruder dimensions
            (0: skip the intruder test and its full SVDs).
        intruder_eps: a vector is an intruder when its largest |cos| with every left singular vector of
            W_aligned is below this.
        include: analyse only tensors whose name matches this regular expression.
        device: where the SVDs run: cpu, cuda or cuda:N.
        progress: called as ``progress(done, total, bytes_done, bytes_total, name)`` after each matrix.
        on_pairs: called with the list of matrix names once pairing is done, before any data is read.
        memo: an :class:`AlignmentMemo` shared by calls with the same BASE, ALIGNED and options, which then
            compute the alignment side once (identical records).

    Raises:
        FileNotFoundError, CheckpointError, HeaderError: unreadable inputs.
        TensorNotFoundError: a matrix present in some of the three checkpoints is missing from another.
        ShapeMismatchError: a matrix has different shapes in the checkpoints, or nothing to analyse.
        ValueError: a bad option value.
    """
    params = {"k": k, "energy": energy, "max_rank": max_rank, "tol": tol, "exact": bool(exact),
              "intruder_k": intruder_k, "intruder_eps": intruder_eps, "include": include, "device": device}
    _validate(params)
    engine_device(device)  # a GPU that is not there fails here, before any file is opened
    t0 = time.perf_counter()
    opened = []

    def open_(x):
        if isinstance(x, (Checkpoint, PeftAdapter)):
            return x
        c = Checkpoint.open(x)
        opened.append(c)
        return c

    try:
        b, a, t = open_(base), open_(aligned), open_(tuned)
        for c, what in ((b, "BASE"), (a, "ALIGNED")):
            if isinstance(c, PeftAdapter):
                raise CheckpointError(f"{c.path}: {what} is a PEFT adapter; only TUNED may be an adapter (on ALIGNED)")
        scheme = detect_scheme(a.tensors)
        if memo is not None:
            memo._bind((b.describe(), a.describe(), {k: v for k, v in params.items() if k != "device"}))
        todo, skipped = _pair(b, a, t, include, scheme)
        if on_pairs:
            on_pairs([name for name, _ in todo])
        records = []
        total = sum(3 * b.tensors[n].nbytes for n, _ in todo)
        done = 0
        for i, (name, target) in enumerate(todo):
            rec = _one(b, a, t, name, target, scheme, params, memo)
            if "skip_reason" in rec:
                skipped.append({"name": name, "reason": rec["skip_reason"]})
            else:
                records.append(rec)
            b.advise(name, "dontneed")
            a.advise(name, "dontneed")
            if target is None:
                t.advise(name, "dontneed")
            done += 3 * b.tensors[name].nbytes
            if progress:
                progress(i + 1, len(todo), done, total, name)
        desc = (b.describe(), a.describe(), t.describe())
    finally:
        for c in opened:
            c.close()
    return DriftResult(base=desc[0], aligned=desc[1], tuned=desc[2], params=params, records=records,
                       summary=summarize(records, intruder_k=intruder_k), skipped=skipped, scheme=scheme,
                       seconds=time.perf_counter() - t0)


def _validate(p: dict) -> None:
    if p["k"] is not None and (not isinstance(p["k"], (int, np.integer)) or p["k"] < 1):
        raise ValueError(f"k must be a positive integer, got {p['k']!r}")
    if not (0.0 < p["energy"] <= 1.0) or math.isnan(p["energy"]):
        raise ValueError(f"energy must be in (0, 1], got {p['energy']}")
    if p["max_rank"] is not None and p["max_rank"] < 1:
        raise ValueError(f"max_rank must be >= 1, got {p['max_rank']}")
    if not (0.0 < p["tol"] < 1.0) or math.isnan(p["tol"]):
        raise ValueError(f"tol must be in (0, 1), got {p['tol']}")
    if p["intruder_k"] < 0:
        raise ValueError(f"intruder_k must be >= 0, got {p['intruder_k']}")
    if not (0.0 < p["intruder_eps"] <= 1.0) or math.isnan(p["intruder_eps"]):
        raise ValueError(f"intruder_eps must be in (0, 1], got {p['intruder_eps']}")
    if p["include"] is not None:
        try:
            re.compile(p["include"])
        except re.error as exc:
            raise ValueError(f"include is not a valid regular expression: {p['include']!r} ({exc})") from None


def _is_matrix(info) -> bool:
    return info.is_float and len(info.shape) == 2


def _pair(b: Checkpoint, a: Checkpoint, t, include, scheme):
    """[(name, LoraTarget or None)] in ALIGNED's file order, and the tensors skipped; raises on a matrix
    missing from one checkpoint or shaped differently in two."""
    inc = re.compile(include) if include else None
    skipped = []
    if isinstance(t, PeftAdapter):
        targets = {tg.base_name: tg for tg in t.targets}
        names = [n for n in targets if not inc or inc.search(n)]
        what = f"adapter target{'s' if len(names) != 1 else ''}"
    else:
        targets = None
        names = sorted({n for c in (b, a, t) for n, i in c.tensors.items() if _is_matrix(i)})
        names = [n for n in names if not inc or inc.search(n)]
        what = "matrices"
        skipped = [{"name": n, "reason": "not a 2-D float matrix"}
                   for n in sorted(set(a.tensors) - set(names)) if not _is_matrix(a.tensors[n])
                   and (not inc or inc.search(n))]
    if not names:
        raise ShapeMismatchError(f"no {what} to analyse" + (f" matching --include {include!r}" if inc else "")
                                 + f" in {t.path}")
    checks = [(b, "BASE"), (a, "ALIGNED")] + ([] if targets is not None else [(t, "TUNED")])
    for n in names:
        for c, what_c in checks:
            if n not in c.tensors:
                others = ", ".join(w for cc, w in checks if n in cc.tensors) or "the adapter"
                raise TensorNotFoundError(
                    f"{c.path}: {what_c} has no tensor '{printable(n)}' (present in {others}); the three "
                    "checkpoints must hold the same matrices (restrict the analysis with --include)")
        shapes = {w: tuple(c.tensors[n].shape) for c, w in checks}
        if len(set(shapes.values())) > 1 or not all(_is_matrix(c.tensors[n]) for c, _ in checks):
            desc = ", ".join(f"{w} {list(s)} {c.tensors[n].dtype}" for (c, w), s in zip(checks, shapes.values()))
            raise ShapeMismatchError(f"tensor '{printable(n)}' differs between the checkpoints ({desc}): "
                                     "BASE, ALIGNED and TUNED must be one architecture")
        if targets is not None:
            tg = targets[n]
            shape = b.tensors[n].shape
            out_in = (shape[1], shape[0]) if name_info(n, scheme).transposed else tuple(shape)
            a_shape, b_shape = t.tensors[tg.a_name].shape, t.tensors[tg.b_name].shape
            if out_in != (b_shape[0], a_shape[1]):
                raise ShapeMismatchError(
                    f"{t.path}: adapter '{printable(tg.a_name)}' {list(a_shape)} / '{printable(tg.b_name)}' "
                    f"{list(b_shape)} gives B·A of shape {[b_shape[0], a_shape[1]]}, but '{printable(n)}' is "
                    f"{list(out_in)} (out, in) in ALIGNED")
    order = sorted(names, key=lambda n: (a.tensors[n].file, a.tensors[n].offset))
    return [(n, targets[n] if targets is not None else None) for n in order], skipped


def _delta(c1: Checkpoint, c0: Checkpoint, name: str) -> tuple[np.ndarray, int]:
    """c1 − c0 of one stored tensor in float64 (the engine's fused upcast-subtract, as compare forms ΔW)."""
    i1, i0 = c1.tensors[name], c0.tensors[name]
    n = int(np.prod(i1.shape))
    d, stats = _core.fused_delta(c1.buffer(name), i1.dtype, c0.buffer(name), i0.dtype, n, True)
    return d.reshape(i1.shape), int(stats["nonfinite_base"] + stats["nonfinite_tuned"])


def _svd(M: np.ndarray, rank, params, seed: int):
    """The engine's truncated SVD of M under the drift rank rule; (U_k, S_k, V_k, info)."""
    U, S, Vt, info = truncated_svd(M, rank=None if rank is None else min(rank, min(M.shape)),
                                   energy=params["energy"], max_rank=params["max_rank"], **_method(params),
                                   seed=seed, device=params["device"])
    kk = int(info["k"])
    return U[:, :kk], S[:kk], Vt[:kk].T, info


class _Factored:
    """ΔT = L·R (L m×r, R r×n) without forming it: the products the metrics need."""

    def __init__(self, L, R):
        self.L, self.R = L, R

    def sumsq(self):
        return float(np.sum((self.L.T @ self.L) * (self.R @ self.R.T)))

    def left(self, U):  # Uᵀ ΔT
        return (U.T @ self.L) @ self.R

    def right(self, V):  # ΔT V
        return self.L @ (self.R @ V)

    def both(self, U, V):  # Uᵀ ΔT V
        return (U.T @ self.L) @ (self.R @ V)

    def inner(self, M):  # ⟨ΔT, M⟩_F
        return float(np.sum((M @ self.R.T) * self.L))

    def dense(self):
        return self.L @ self.R


class _Dense(_Factored):
    def __init__(self, D):
        self.D = D

    def sumsq(self):
        return float(np.sum(self.D * self.D))

    def left(self, U):
        return U.T @ self.D

    def right(self, V):
        return self.D @ V

    def both(self, U, V):
        return U.T @ self.D @ V

    def inner(self, M):
        return float(np.sum(self.D * M))

    def dense(self):
        return self.D


def _one(b, a, t, name, target, scheme, params, memo: AlignmentMemo | None = None) -> dict:
    ni = name_info(name, scheme)
    stored = a.tensors[name].shape
    seed = _seed(name)
    dA, bad = _delta(a, b, name)
    if bad:
        return {"skip_reason": f"{bad} non-finite values in BASE or ALIGNED"}
    W_al = a.read(name, "f64")
    if ni.transposed:  # work in (out, in) orientation: left = output space
        dA, W_al = dA.T, W_al.T
    if target is None:
        dT_arr, bad = _delta(t, a, name)
        if bad:
            return {"skip_reason": f"{bad} non-finite values in TUNED"}
        dT = _Dense(dT_arr.T if ni.transposed else dT_arr)
    else:
        A = t.weights.read(target.a_name, "f64")  # (r, in)
        B = t.weights.read(target.b_name, "f64")  # (out, r)
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            return {"skip_reason": "non-finite values in the adapter"}
        dT = _Factored(target.scale * B, A)
    m, n = dA.shape
    rec = {"name": name, "layer": ni.layer, "module": ni.module, "shape": [int(m), int(n)],
           "stored_shape": [int(s) for s in stored], "transposed": ni.transposed,
           "tuned_kind": "lora" if target is not None else "dense"}
    if target is not None:
        rec["lora_rank"], rec["lora_scale"] = int(target.rank), float(target.scale)
    aa = float(np.sum(dA * dA))
    tt = dT.sumsq()
    aligned_sq = float(np.sum(W_al * W_al))
    rec.update(norm_delta_A=math.sqrt(aa), norm_delta_T=math.sqrt(tt), norm_aligned=math.sqrt(aligned_sq),
               rel_delta_T=math.sqrt(tt / aligned_sq) if aligned_sq > 0 else float("nan"))
    # ΔA's top subspace (and, below, the intruder control): from BASE and ALIGNED alone, so from the memo
    # when an earlier call on the same pair computed them
    known = memo.entries.get(name) if memo is not None else None
    if known is not None:
        memo.hits += 1
        U_A, S_A, V_A, info = known["svd_A"]
    else:
        U_A, S_A, V_A, info = _svd(dA, params["k"], params, seed)
        known = {"svd_A": (U_A, S_A, V_A, info)}
        if memo is not None:
            memo.entries[name] = known
    kA = U_A.shape[1]
    rec.update(k_A=kA, svd_method_A=info["method"], energy_reached_A=bool(info["energy_reached"]))
    nan = float("nan")
    # energy of ΔT in ΔA's subspaces
    if kA and tt > 0:
        e_left = float(np.sum(dT.left(U_A) ** 2))
        e_right = float(np.sum(dT.right(V_A) ** 2))
        core = dT.both(U_A, V_A)
        e_both = float(np.sum(core ** 2))
    else:
        e_left = e_right = e_both = nan
        core = np.zeros((kA, kA))
    chances = {"left": kA / m, "right": kA / n, "both": kA * kA / (m * n)}
    for side, e in (("left", e_left), ("right", e_right), ("both", e_both)):
        v = e / tt if tt > 0 else nan
        rec[f"energy_{side}"] = v
        rec[f"energy_{side}_chance"] = chances[side]
        rec[f"energy_{side}_ratio"] = v / chances[side] if chances[side] > 0 else nan
    # signed projection on ΔA, and on its top-k part ΔA_k = U_A S_A V_Aᵀ
    inner = dT.inner(dA)
    inner_k = float(np.sum(S_A * np.diag(core))) if kA and tt > 0 else 0.0
    aa_k = float(np.sum(S_A ** 2))
    sd = 1.0 / math.sqrt(m * n)  # cos of a random direction of R^{m×n} with a fixed one: mean 0, sd 1/√(mn)
    both_norm = math.sqrt(tt * aa)
    rec.update(inner_TA=inner, undo=-inner / aa if aa > 0 else nan,
               undo_chance_sd=math.sqrt(tt) / math.sqrt(aa) * sd if aa > 0 else nan,
               cos_TA=inner / both_norm if both_norm > 0 else nan, cos_TA_chance=0.0, cos_TA_chance_sd=sd,
               inner_TA_topk=inner_k, norm_delta_A_topk=math.sqrt(aa_k),
               undo_topk=-inner_k / aa_k if aa_k > 0 else nan,
               cos_TA_topk=inner_k / math.sqrt(tt * aa_k) if tt > 0 and aa_k > 0 else nan, cos_TA_topk_chance_sd=sd)
    # principal angles between ΔT's and ΔA's top subspaces: mean sin θ of ΔT's top-k_T vectors
    if isinstance(dT, _Dense):
        U_T, _, V_T, info_T = _svd(dT.D, params["k"], params, seed + 1)
    else:
        U_T, V_T, info_T = _factored_svd(dT, params, seed + 1)
    kT = U_T.shape[1]
    rec["k_T"] = kT
    for side, Ub, Ut, dim in (("left", U_A, U_T, m), ("right", V_A, V_T, n)):
        if kA and kT:
            s = sin_theta(Ub, Ut)
            rec[f"sin_theta_{side}"] = float(np.mean(s))
        else:
            rec[f"sin_theta_{side}"] = nan
        rec[f"sin_theta_{side}_chance"] = sin_theta_chance(dim, kA) if kA else nan
    # intruder dimensions of W_tuned against W_aligned (and, as the control, of W_aligned against W_base)
    ik = min(params["intruder_k"], m, n)
    rec["intruder_k"] = ik
    if ik:
        W_tu = W_al + dT.dense()
        U_al = known.get("U_al")
        if U_al is None:
            U_al = _all_left(W_al, seed + 2, params)
            if memo is not None and memo._keep_vectors(U_al):
                known["U_al"] = U_al
        if "idx0" not in known:
            known["idx0"], _ = intruders(U_al[:, :ik], _all_left(W_al - dA, seed + 4, params), params["intruder_eps"])
        idx0 = known["idx0"]
        idx, cos = intruders(_top_left(W_tu, ik, seed + 3, params), U_al, params["intruder_eps"])
        rec.update(intruder_count=len(idx), intruder_indices=idx, intruder_max_cos=cos.tolist(),
                   intruder_count_alignment=len(idx0))
    return rec


def _seed(name: str) -> int:
    """A per-tensor seed (results do not depend on the order of tensors)."""
    import zlib

    return zlib.crc32(name.encode()) * 8


def _factored_svd(dT: _Factored, params, seed):
    """Top singular subspaces of L·R from its factors: QR of both, the engine's SVD of the small core."""
    Q_L, R_L = np.linalg.qr(dT.L)
    Q_R, R_R = np.linalg.qr(dT.R.T)
    U_c, S_c, V_c, info = _svd(R_L @ R_R.T, params["k"], params, seed)
    return Q_L @ U_c, Q_R @ V_c, info


def _method(params) -> dict:
    """The engine's SVD algorithm choice: exact LAPACK when asked, else the cheapest that meets ``tol``
    (at every size: exact_max_dim 0)."""
    return {"exact": params["exact"], "exact_max_dim": 0, "tol": params["tol"]}


def _all_left(W, seed, params):
    """Every left singular vector of W (min(m, n) of them); asking for the whole spectrum lets the engine
    take its Gram-matrix path, the cheapest for a full decomposition."""
    U, _, _, _ = truncated_svd(W, rank=min(W.shape), **_method(params), full_spectrum=True, seed=seed,
                               device=params["device"])
    return U


def _top_left(W, k, seed, params):
    U, _, _, _ = truncated_svd(W, rank=k, **_method(params), seed=seed, device=params["device"])
    return U[:, :k]


def intruders(U_top: np.ndarray, U_ref: np.ndarray, eps: float) -> tuple[list[int], np.ndarray]:
    """Intruder dimensions (Shuttleworth et al. 2024): the columns i of ``U_top`` (top left singular vectors
    of the fine-tuned matrix, in order) whose largest |cos| with every column of ``U_ref`` (the left
    singular vectors of the matrix before) is below ``eps``. Returns (indices, that largest |cos| per column)."""
    cos = np.abs(U_top.T @ U_ref).max(axis=1) if U_ref.shape[1] else np.zeros(U_top.shape[1])
    return [int(i) for i in np.flatnonzero(cos < eps)], cos


# -- the whole-model summary ------------------------------------------------------------------------------


def _columns(r: dict) -> dict:
    tt, aa = r["norm_delta_T"] ** 2, r["norm_delta_A"] ** 2
    m, n = r["shape"]
    kT = r["k_T"] if r["k_A"] else 0
    return {"e_left": r["energy_left"] * tt, "e_right": r["energy_right"] * tt, "e_both": r["energy_both"] * tt,
            "tt": tt,
            "c_left": r["energy_left_chance"] * tt, "c_right": r["energy_right_chance"] * tt,
            "c_both": r["energy_both_chance"] * tt, "neg_inner": -r["inner_TA"], "aa": aa,
            "neg_inner_k": -r["inner_TA_topk"], "aa_k": r["norm_delta_A_topk"] ** 2,
            "sin_left_sum": kT * r["sin_theta_left"] if kT else 0.0,
            "sin_right_sum": kT * r["sin_theta_right"] if kT else 0.0,
            "k_T": kT, "c_sin_left": kT * r["sin_theta_left_chance"] if kT else 0.0,
            "c_sin_right": kT * r["sin_theta_right_chance"] if kT else 0.0,
            "intr": r.get("intruder_count", 0), "intr_ctl": r.get("intruder_count_alignment", 0),
            "intr_k": r.get("intruder_k", 0), "tt_aa_mn": tt * aa / (m * n)}


def _table(records) -> np.ndarray:
    rows = [[cols[c] for c in _COLUMNS] for cols in map(_columns, records)]
    X = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(_COLUMNS))
    return np.nan_to_num(X, nan=0.0)  # a matrix with ΔT = 0 adds nothing to any sum


def _stats(sums: np.ndarray) -> dict:
    """Every aggregate (and its ratio to chance) from column sums; ``sums`` (..., n_columns)."""
    col = {c: sums[..., i] for i, c in enumerate(_COLUMNS)}
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for key, (num, den, chance) in AGGREGATES.items():
            out[key] = col[num] / col[den]
            if chance:
                out[key + "_chance"] = col[chance] / col[den]
                out[key + "_ratio"] = col[num] / col[chance]
        # the whole group as one vector: cos(ΔT, ΔA) over all its matrices
        out["cos_TA"] = -col["neg_inner"] / np.sqrt(col["tt"] * col["aa"])
    return out


def bootstrap_ci(X: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals over matrices (rows of X, resampled with replacement) of every
    aggregate of :func:`_stats`; None for fewer than 3 matrices."""
    N = X.shape[0]
    if N < 3:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, N, size=(n_boot, N))
    boot = _stats(X[idx].sum(axis=1))
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {key: [float(v) for v in np.nanpercentile(vals, q)] for key, vals in boot.items()
            if np.isfinite(vals).any()}


def _group(records) -> dict:
    X = _table(records)
    s = X.sum(axis=0)
    point = _stats(s)
    ci = bootstrap_ci(X)
    col = {c: s[i] for i, c in enumerate(_COLUMNS)}
    out = {"n_matrices": len(records)}
    for key, v in point.items():
        out[key] = float(v)
        if not key.endswith("_chance"):  # a chance level is a control, not a measurement: no interval
            out[key + "_ci95"] = ci.get(key)
    # a random direction: undo and cos have mean 0; their sd over the group
    out["undo_chance_sd"] = float(math.sqrt(col["tt_aa_mn"]) / col["aa"]) if col["aa"] > 0 else None
    n_el = sum(r["shape"][0] * r["shape"][1] for r in records)
    out["cos_TA_chance_sd"] = 1.0 / math.sqrt(n_el) if n_el else None
    out["intruder_count"] = int(col["intr"])
    out["intruder_count_alignment"] = int(col["intr_ctl"])
    out["intruder_tested"] = int(col["intr_k"])
    return out


def summarize(records: list[dict], intruder_k: int = 10) -> dict:
    """The whole-model aggregates (energy-weighted: Σ numerators / Σ denominators), per layer and per
    module type, with 95% bootstrap intervals over matrices and the chance levels, and the verdict."""
    if not records:
        return {"model": {"n_matrices": 0}, "by_layer": {}, "by_module": {}, "verdict": "no matrix was analysed."}
    model = _group(records)
    by_layer, by_module = {}, {}
    for r in records:
        if r.get("layer") is not None:
            by_layer.setdefault(str(r["layer"]), []).append(r)
        by_module.setdefault(r.get("module") or "other", []).append(r)
    out = {"model": model,
           "by_layer": {k: _group(v) for k, v in sorted(by_layer.items(), key=lambda kv: int(kv[0]))},
           "by_module": {k: _group(v) for k, v in by_module.items()},
           "bootstrap": {"resamples": N_BOOT, "seed": BOOT_SEED, "level": 0.95, "over": "matrices"}}
    out["verdict"] = verdict(model)
    return out


def percent(v) -> str:
    """A share as a percentage; below 0.1% with two significant digits (chance levels are often tiny)."""
    if v is None or not math.isfinite(v):
        return "–"
    return f"{100 * v:.2g}%" if 0 < abs(v) < 1e-3 else f"{100 * v:.1f}%"


def _x(v) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.0f}×" if abs(v) >= 100 else f"{v:.3g}×"


def verdict(g: dict) -> str:
    """Plain-language verdict of one group's aggregates: each number with its interval and chance level."""
    n = g.get("n_matrices", 0)
    if not n or g.get("energy_both") is None or not math.isfinite(g["energy_both"]):
        return "ΔT is zero (TUNED equals ALIGNED) or ΔA is zero: nothing to compare."
    ci, rci = g.get("energy_both_ci95"), g.get("energy_both_ratio_ci95")
    parts = []
    e = (f"ΔT puts {percent(g['energy_both'])} of its energy in the alignment subspace (ΔA's top singular "
         f"directions on both sides; chance {percent(g['energy_both_chance'])}), {_x(g['energy_both_ratio'])} chance")
    if rci:
        e += f" [95% interval {_x(rci[0])} to {_x(rci[1])}]"
        e = ("no evidence of overlap: " + e + ", an interval that includes chance") if rci[0] <= 1 <= rci[1] else e
    else:
        e += " (too few matrices for an interval)"
    parts.append(e[0].upper() + e[1:] + ".")
    u, uci, sd = g["undo"], g.get("undo_ci95"), g.get("undo_chance_sd") or 0.0
    ctl = f"a random ΔT of the same size gives 0 ± {percent(sd)}"
    if uci is None:
        parts.append(f"It undoes {percent(u)} of the alignment change ({ctl}; too few matrices for an interval).")
    elif uci[0] <= 0 <= uci[1] or abs(u) <= 3 * sd:
        parts.append(f"No evidence that it undoes or reinforces the alignment change: undo {percent(u)} "
                     f"[95% interval {percent(uci[0])} to {percent(uci[1])}] ({ctl}).")
    elif u > 0:
        parts.append(f"It undoes {percent(u)} [95% interval {percent(uci[0])} to {percent(uci[1])}] of the "
                     f"alignment change ({ctl}).")
    else:
        parts.append(f"It reinforces the alignment change: undo {percent(u)} [95% interval {percent(uci[0])} to "
                     f"{percent(uci[1])}] ({ctl}).")
    if g.get("intruder_tested"):
        ici = g.get("intruders_ci95")
        parts.append(f"Intruder dimensions: {g['intruder_count']} of the {g['intruder_tested']} top singular "
                     f"vectors tested ({percent(g['intruders'])}"
                     + (f" [95% interval {percent(ici[0])} to {percent(ici[1])}]" if ici else "")
                     + f"); the alignment step itself, tested the same way against BASE: "
                       f"{g['intruder_count_alignment']} ({percent(g['intruders_alignment'])}).")
    return " ".join(parts)
