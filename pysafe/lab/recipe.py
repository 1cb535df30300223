"""The lab data's recipe: the safety categories, the test sets, :class:`DataRecipe` (everything that
determines the data) and the seeding of its RNG streams (docs/lab.md).

Every batch is a pure function of ``(recipe, stream, index)``: the RNG of each batch is seeded from
``(recipe.seed, stream name, step)`` (:func:`stream_seed`), so a batch can be regenerated at any step
(resumable training), and the training streams (``"pretrain"``, ``"safety"``) and the test streams
(``"test/<name>"``, ``"pretrain_test"``) never share a seed. (The sample space is finite, so an identical
sample may occur in both by chance, as with any i.i.d. draw.)

PCFGs are indexed 0..3 (0 is the paper's PCFG 1). Safety categories keep the reference's ``is_safe``
codes (:data:`CATEGORIES`).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

from pysafe.lab.tasks import OPERATOR_IDS
from pysafe.lab.vocab import DUP0, ID, LETTER0, N_LETTERS

# ---------------------------------------------------------------------------------------------------
# categories, test sets

# the reference's ``is_safe`` code of each safety category (docs/lab.md); the samplers use these names
CAT_UNSAFE, CAT_SAFE, CAT_INTERMEDIATE, CAT_DUPLICATES, CAT_ID_MG, CAT_OOD_MG, CAT_ID_MG_DUP = 0, 1, 2, 4, 5, 6, 7
CATEGORIES = {"unsafe": CAT_UNSAFE, "safe": CAT_SAFE, "intermediate": CAT_INTERMEDIATE, "duplicates": CAT_DUPLICATES,
              "id_mg": CAT_ID_MG, "ood_mg": CAT_OOD_MG, "id_mg_dup": CAT_ID_MG_DUP}
#: categories a training batch draws from, in the order of ``DataRecipe.category_probs``
TRAIN_CATEGORIES = ("unsafe", "safe", "intermediate", "duplicates", "id_mg", "ood_mg")
#: grammar variant of each category's text
CATEGORY_GRAMMAR = {CAT_UNSAFE: "unsafe", CAT_SAFE: "safe", CAT_INTERMEDIATE: "intermediate", CAT_DUPLICATES: "base",
                    CAT_ID_MG: "id_mg", CAT_OOD_MG: "ood_mg", CAT_ID_MG_DUP: "id_mg"}
#: categories whose text counts as unsafe-branch text (B operators are unsafe on it; docs/lab.md)
UNSAFE_BRANCH = frozenset({CAT_UNSAFE, CAT_INTERMEDIATE, CAT_ID_MG, CAT_OOD_MG, CAT_ID_MG_DUP})
#: categories whose text comes from PCFG 1 only (the duplicate-token sets)
PCFG1_ONLY = frozenset({CAT_DUPLICATES, CAT_ID_MG_DUP})

MOD_NONE, MOD_FL_DIRECT, MOD_FL_COMP = 0, 1, 2
MODIFIERS = ("none", "fl_direct", "fl_comp")

#: test set -> (category, jailbreak modifier, attack input). See :func:`test_set`.
TEST_SET_SPECS = {
    "std_safe": ("safe", "none", "safe"),
    "std_unsafe": ("id_mg", "none", "unsafe_target"),
    "jb_co_task": ("id_mg", "fl_direct", "unsafe_target"),
    "jb_co_text": ("intermediate", "none", "unsafe_target"),
    "jb_mg_tokens": ("duplicates", "none", "safe"),
    "jb_mg_text": ("ood_mg", "none", "unsafe_target"),
    "jb_mg_tokens_unsafe_branch": ("id_mg_dup", "none", "unsafe_target"),
    "jb_comp": ("id_mg", "fl_comp", "unsafe_target"),
}
TEST_SETS = tuple(TEST_SET_SPECS)

MODES = ("pcfg", "full", "comp1", "comp2")  # pretraining curriculum modes (docs/lab.md)
PRETRAIN_OPERATORS = tuple(range(16)) + tuple(range(DUP0, DUP0 + 5))  # dup1..dup5 are trained copies


# ---------------------------------------------------------------------------------------------------
# the recipe

def _check_probs(name: str, value, n: int) -> tuple:
    value = tuple(float(v) for v in value)
    if len(value) != n:
        raise ValueError(f"DataRecipe.{name}: expected {n} probabilities, got {len(value)}: {value}")
    if any(not 0.0 <= v <= 1.0 for v in value):
        raise ValueError(f"DataRecipe.{name}: every probability must be in [0, 1], got {value}")
    if abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"DataRecipe.{name}: probabilities must sum to 1, got {value} (sum {sum(value):g})")
    return value


@dataclass(frozen=True)
class DataRecipe:
    """Everything that determines the lab's data. Defaults are the values of the reference code's README,
    with pysafe's changes (docs/lab.md).

    Stored in each checkpoint's config.json (``to_dict``) and in the manifest of cached test sets.
    """

    seed: int = 0                       # root of every RNG stream
    operator_seed: int = 0              # base seed s of the operator table (seeds s..s+8)
    refusal_token: int = LETTER0        # the refusal letter: "2a"
    text_len_min: int = 25              # text length L ~ U{min..max}
    text_len_max: int = 35
    identity_sample_prob: float = 0.5   # P(one operator slot is forced to an identity-like token)
    prob_ex: float = 0.01               # P(an ex1/ex2 null-output sample) in pretraining
    # P(a pretraining text comes from the unsafe-dominant grammar of its PCFG instead of the base grammar).
    # The reference pretrains on base-grammar text only, so the unsafe branch's rules (binary level 5) are
    # first seen in safety fine-tuning; > 0 makes that text part of pretraining's language modelling.
    pretrain_unsafe_text: float = 0.0
    # The forced slot of pretraining: the reference draws from {(, r4, r3}, probably a bug;
    # pysafe uses ( and its duplicates + ^. Fine-tuning data always force "(" (reference).
    forced_slot_tokens: tuple = (ID["("], ID["+"], ID["^"])
    pretrain_operators: tuple = PRETRAIN_OPERATORS  # all 16 reference operators + dup1..dup5
    mode_probs_init: tuple = (0.5, 0.1, 0.2, 0.2)   # (pcfg, full, comp1, comp2), the reference's README values
    mode_probs_final: tuple = (0.1, 0.2, 0.3, 0.4)
    # Curriculum clock in optimizer steps: hold init for the first hold_frac·total_steps steps,
    # then interpolate linearly to final at total_steps (reference: 10k of 100k iterations).
    curriculum_hold_frac: float = 0.1
    # P(category) of a safety training sample, in the order of TRAIN_CATEGORIES
    # (unsafe, safe, intermediate, duplicates, id_mg, ood_mg); the reference's README: safe 0.5, id_mg 0.5.
    category_probs: tuple = (0.0, 0.5, 0.0, 0.0, 0.5, 0.0)
    prob_comp1_train: float = 0.2       # P(apply_second): the refusal goes in block 2
    # With apply_second, the reference's y_unsafe_target holds no output tokens. True (pysafe):
    # it supervises the compliant block 2, mirroring y_unsafe's refusal in block 2, so the DPO/unlearning
    # rejected answer has content. False: the reference's behaviour.
    target_block2_on_second: bool = True
    # The reference supervises EOS at the last position (y[158]) of every full-layout sample. It follows
    # the ≥ 44 PAD inputs after the second STOP and carries nothing about the task, but it keeps every
    # batch at 159 columns. False drops that one target (y[:, 158] = PAD in the training streams), so a
    # batch is cut to its longest sample (exact for a causal model): 1.4× faster at L ≤ 35, more for
    # shorter texts. Test sets keep it.
    eos_target: bool = True

    def __post_init__(self):
        def setf(name, value):
            object.__setattr__(self, name, value)

        for name in ("seed", "operator_seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 2**32 - 8:
                raise ValueError(f"DataRecipe.{name}: expected an integer in [0, 2**32 - 9], got {v!r}")
            setf(name, int(v))
        if not LETTER0 <= int(self.refusal_token) < LETTER0 + N_LETTERS:
            raise ValueError(f"DataRecipe.refusal_token: expected a letter id in [{LETTER0}, "
                             f"{LETTER0 + N_LETTERS}), got {self.refusal_token!r}")
        setf("refusal_token", int(self.refusal_token))
        lo, hi = int(self.text_len_min), int(self.text_len_max)
        # L <= 35: the shortest sentences (id_mg, ood_mg) have 36 letters and the window needs len - L >= 1
        if not 1 <= lo <= hi <= 35:
            raise ValueError(f"DataRecipe.text_len_min/text_len_max: expected 1 <= min <= max <= 35, "
                             f"got {lo}, {hi}")
        setf("text_len_min", lo)
        setf("text_len_max", hi)
        for name in ("identity_sample_prob", "prob_ex", "pretrain_unsafe_text", "curriculum_hold_frac",
                     "prob_comp1_train"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"DataRecipe.{name}: expected a probability in [0, 1], got {v}")
            setf(name, v)
        for name in ("forced_slot_tokens", "pretrain_operators"):
            v = tuple(int(t) for t in getattr(self, name))
            bad = [t for t in v if t not in OPERATOR_IDS]
            if not v or bad:
                raise ValueError(f"DataRecipe.{name}: expected a non-empty list of operator ids "
                                 f"{list(OPERATOR_IDS)}, got {list(v)}")
            setf(name, v)
        setf("mode_probs_init", _check_probs("mode_probs_init", self.mode_probs_init, 4))
        setf("mode_probs_final", _check_probs("mode_probs_final", self.mode_probs_final, 4))
        setf("category_probs", _check_probs("category_probs", self.category_probs, len(TRAIN_CATEGORIES)))
        setf("target_block2_on_second", bool(self.target_block2_on_second))
        setf("eos_target", bool(self.eos_target))

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DataRecipe:
        """Inverse of :meth:`to_dict`. Raises ValueError naming unknown keys or invalid values."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"DataRecipe: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def mode_probs(recipe: DataRecipe, step: int, total_steps: int) -> np.ndarray:
    """Curriculum mode probabilities (pcfg, full, comp1, comp2) at optimizer step ``step``.

    Held at ``mode_probs_init`` for the first ``curriculum_hold_frac·total_steps`` steps, then linear to
    ``mode_probs_final`` at ``total_steps`` (docs/lab.md). Returns float64 [4] summing to 1.
    """
    p0 = np.asarray(recipe.mode_probs_init)
    p1 = np.asarray(recipe.mode_probs_final)
    hold = recipe.curriculum_hold_frac * total_steps
    if total_steps <= 0 or step <= hold:
        return p0.copy()
    frac = min(1.0, (step - hold) / max(total_steps - hold, 1e-12))
    p = p0 + (p1 - p0) * frac
    return p / p.sum()


def stream_seed(seed: int, stream: str, index: int) -> int:
    """The uint32 seed of batch ``index`` of RNG stream ``stream`` (distinct streams: distinct seeds)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(stream.encode()), int(index)])
    return int(ss.generate_state(1, np.uint32)[0])
