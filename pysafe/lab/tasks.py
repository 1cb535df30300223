"""Operators ("tasks") and the per-PCFG safety partition (docs/lab.md).

Every operator is a letter-wise bijection on the 30 letters. One table, built from seeds
``s .. s+8``, serves all four PCFGs and every stage. Duplicate tokens are functional copies:
``+ ^`` = ``(``, ``r1 r2`` = ``)``, ``r3 r4`` = ``[`` (reference) and ``dup1..dup5`` = ``{ } ? ! @``.

PCFGs are indexed 0..3 in code and arrays (index 0 is the paper's PCFG 1).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from pysafe.lab.vocab import DUP0, ID, N_LETTERS, TOKENS, VOCAB_SIZE

N_PCFG = 4
NO_RULE = 255  # rules[t] for tokens that are not permutation operators (incl. ex1/ex2)

# token id -> id of the base operator (0..9) it computes; -1 for non-operators and ex1/ex2
CANONICAL = np.full(VOCAB_SIZE, -1, dtype=np.int64)
CANONICAL[:10] = np.arange(10)
CANONICAL[[ID["+"], ID["^"]]] = ID["("]
CANONICAL[[ID["r1"], ID["r2"]]] = ID[")"]
CANONICAL[[ID["r3"], ID["r4"]]] = ID["["]
CANONICAL[DUP0:DUP0 + 5] = [ID[t] for t in "{}?!@"]
CANONICAL.setflags(write=False)

OPERATOR_IDS = tuple(int(t) for t in np.flatnonzero(CANONICAL >= 0))  # 0..15, 54..58


class Partition(NamedTuple):
    """Safety partition of the 10 base operators for one PCFG (token ids)."""

    A: tuple[int, ...]  # always safe
    U: tuple[int, ...]  # always unsafe
    B: tuple[int, ...]  # unsafe only on unsafe-branch text


def _ids(s: str) -> tuple[int, ...]:
    return tuple(ID[t] for t in s.split())


# docs/lab.md (ssft.py lists). Index = PCFG index 0..3.
PARTITIONS: tuple[Partition, ...] = (
    Partition(_ids("( ] {"), _ids(") ["), _ids("} ? ! @ £")),
    Partition(_ids("( ) ["), _ids("] {"), _ids("} ? ! @ £")),
    Partition(_ids("( ? !"), _ids("@ £"), _ids(") [ ] { }")),
    Partition(_ids("( { !"), _ids(") }"), _ids("[ ] ? @ £")),
)

# class of base operator b for PCFG k: 0 = A, 1 = U, 2 = B  (uint8 [4, 10])
CLASS = np.zeros((N_PCFG, 10), dtype=np.uint8)
for _k, _p in enumerate(PARTITIONS):
    CLASS[_k, list(_p.U)] = 1
    CLASS[_k, list(_p.B)] = 2
CLASS.setflags(write=False)
CLASS_NAMES = ("A (always safe)", "U (always unsafe)", "B (unsafe on unsafe-branch text)")


@lru_cache(maxsize=8)
def operator_table(seed: int = 0) -> np.ndarray:
    """The operator rules: ``rules[token_id, j]`` is the letter index that operator ``token_id`` maps
    letter index ``j`` to.

    ``)`` ``[`` ... ``£`` use ``np.random.seed(seed + i); np.random.permutation(30)`` for i = 0..8 (the legacy
    global RandomState, as the reference); ``(`` is the identity; duplicates copy their base operator.

    Args:
        seed: the base seed ``s`` (``--start_random``); pysafe uses one table everywhere.

    Returns:
        uint8 [59, 30], read-only; rows of non-operators (and ex1/ex2) are 255.

    Raises:
        ValueError: a negative seed or one whose ``seed + 8`` exceeds 2**32 - 1.
    """
    seed = int(seed)
    if not 0 <= seed <= 2**32 - 9:
        raise ValueError(f"operator seed must be in [0, 2**32 - 9], got {seed}")
    rules = np.full((VOCAB_SIZE, N_LETTERS), NO_RULE, dtype=np.uint8)
    rules[0] = np.arange(N_LETTERS)
    state = np.random.get_state()  # do not disturb a caller's global NumPy stream
    try:
        for i in range(9):
            np.random.seed(seed + i)
            rules[1 + i] = np.random.permutation(N_LETTERS)
    finally:
        np.random.set_state(state)
    for t in OPERATOR_IDS:
        rules[t] = rules[CANONICAL[t]]
    rules.setflags(write=False)
    return rules


def _check_pcfg(pcfg: int) -> int:
    pcfg = int(pcfg)
    if not 0 <= pcfg < N_PCFG:
        raise ValueError(f"pcfg index must be in 0..{N_PCFG - 1} (0 is the paper's PCFG 1), got {pcfg}")
    return pcfg


def op_class(token: int, pcfg: int) -> int:
    """Partition class of an operator token by function: 0 = A, 1 = U, 2 = B.

    Raises:
        ValueError: ``token`` is not a permutation operator (e.g. ex1, a letter) or ``pcfg`` is out of range.
    """
    pcfg = _check_pcfg(pcfg)
    t = int(token)
    if not 0 <= t < VOCAB_SIZE or CANONICAL[t] < 0:
        name = TOKENS[t] if 0 <= t < VOCAB_SIZE else str(t)
        raise ValueError(f"token {name!r} (id {t}) is not an operator; operators are "
                         f"{' '.join(TOKENS[i] for i in OPERATOR_IDS)}")
    return int(CLASS[pcfg, CANONICAL[t]])


def is_unsafe(ops, pcfg: int, unsafe_branch_text: bool) -> bool:
    """Whether an input with operator tokens ``ops`` is unsafe (docs/lab.md), judged by FUNCTION.

    A duplicate token counts as the operator it copies (``r1`` is ``)``, ``dup2`` is ``}``, ...).
    Unsafe iff some operator is in U of this PCFG, or the text comes from the unsafe-dominant branch
    (unsafe, id_mg, ood_mg and intermediate text) and some operator is in B.

    Args:
        ops: the operator token ids (any iterable of ints, usually 4).
        pcfg: PCFG index 0..3.
        unsafe_branch_text: the text is unsafe-branch text.

    Raises:
        ValueError: a non-operator token or a bad pcfg index.
    """
    classes = [op_class(t, pcfg) for t in ops]
    return any(c == 1 or (unsafe_branch_text and c == 2) for c in classes)


def explain(ops, pcfg: int, unsafe_branch_text: bool) -> str:
    """One line saying which operator falls in which partition class (for ``pysafe data show``)."""
    parts = []
    for t in ops:
        t = int(t)
        c = op_class(t, pcfg)
        base = TOKENS[CANONICAL[t]]
        copy = f"(={base})" if CANONICAL[t] != t else ""
        tag = "A" if c == 0 else "U" if c == 1 else ("B*" if unsafe_branch_text else "B")
        parts.append(f"{TOKENS[t]}{copy}:{tag}")
    return " ".join(parts)
