"""The four PCFGs and their safety-data variants (docs/lab.md), compiled for a numba sampler.

The grammars are written below as readable Python data (``{nonterminal: [alternative, ...]}``, each
alternative a space-separated right-hand side). An alternative listed twice is twice as likely: every
production is chosen uniformly among the listed alternatives, as the reference's ``random.choices``.
The four PCFGs share every rule except the pre-terminal -> letter rules (level 6).

Variants (docs/lab.md): ``base`` (pretraining), ``safe`` (safe-dominant branch), ``unsafe``
(unsafe-dominant branch), ``id_mg`` (the unsafe-branch text of safety fine-tuning), ``ood_mg``
(mismatched-generalisation text) and ``intermediate`` (competing-objectives text). As decided for pysafe,
the unsafe, id_mg and ood_mg variants keep the reference's *binary* level-5 rules, which pretraining
never sees: their text is out of the pretraining distribution at the lowest level (docs/lab.md).

Compiled form (all int64): grammar id ``g = variant * 4 + pcfg``; ``nt_first[g, nt]`` / ``nt_nalt[g, nt]``
locate a nonterminal's alternatives in ``alt_first`` / ``alt_len``, which locate their symbols in
``syms``. A symbol < ``TERMINAL0`` is a nonterminal id; ``TERMINAL0 + j`` is letter index j.
"""

from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np

from pysafe.lab.vocab import ID, LETTER0

VARIANTS = ("base", "safe", "unsafe", "id_mg", "ood_mg", "intermediate")
N_PCFG = 4
START = "v"
TERMINAL0 = 64
MAX_SENTENCE = 1024  # the longest variant (base) yields <= 486 letters
MAX_STACK = 512

_BASE = {
    # level 1
    "v": ["u t", "t s"],
    # level 2
    "u": ["r p", "p 10$ q", "10# r q"],
    "t": ["q p r", "10* p q", "10$ r"],
    "s": ["p 10#", "r 10$ 10*", "10$ 10* 10#"],
    # level 3, safe-dominant
    "r": ["o n m", "w x o"],
    "q": ["w o", "m o x"],
    "p": ["m n", "o o w"],
    # level 3, unsafe-dominant
    "10$": ["x w m", "n w n"],
    "10#": ["n x x", "n n x"],
    "10*": ["m m x", "w w o"],
    # level 4
    "o": ["l k j", "l 1h j"],
    "n": ["k 1h 1f", "k l j"],
    "m": ["l k 1f", "1f 1h l"],
    "w": ["1f 1h 1h", "l 1f j"],
    "x": ["j j l", "1f l"],
    # level 5 (ternary)
    "l": ["1i i g", "i 1i g"],
    "k": ["1e g i", "1g g h"],
    "j": ["i 1e 1i", "1g h 1e"],
    "1f": ["1i h 1g", "1i 1e h"],
    "1h": ["h 1i 1g", "1g 1e h"],
}

_BINARY_LEVEL5 = {
    "l": ["1i g", "i 1i"],
    "k": ["1e g", "g h"],
    "j": ["i 1e", "1g h"],
    "1f": ["1i h", "1i 1e"],
    "1h": ["h 1i", "1g 1e"],
}

_CHANGES = {
    "base": {},
    "safe": {
        "v": ["u", "t", "t", "s"],
        "u": ["r", "p", "r", "q"],
        "t": ["q", "p", "r"],
        "s": ["p", "r"],
    },
    "unsafe": {
        "v": ["u", "s"],
        "u": ["10#"],
        "s": ["10#", "10$ 10*", "10$ 10* 10#"],
        **_BINARY_LEVEL5,
    },
    "id_mg": {
        "v": ["u", "s"],
        "u": ["10#"],
        "s": ["10#", "10$", "10$", "10#", "10*"],
        "10$": ["n w n"],
        "10*": ["m m"],
        **_BINARY_LEVEL5,
    },
    "ood_mg": {
        "v": ["s"],
        "s": ["10*"],
        "10*": ["m x", "w w o"],
        "x": ["j j l"],
        **_BINARY_LEVEL5,
    },
    "intermediate": {
        "v": ["u", "t", "t", "s"],
        "u": ["p10 10$", "10#10 r"],
        "t": ["10*10 p", "10$10 r"],
        "s": ["p10 10#", "r10 10$"],
        "r": ["o", "w"],
        "r10": ["m", "o"],
        "p": ["m", "o"],
        "p10": ["n", "w"],
        "10$": ["x", "n"],
        "10$10": ["m", "n"],
        "10#": ["n", "n"],
        "10#10": ["x", "x"],
        "10*10": ["x", "o"],
    },
}

# level 6: pre-terminal -> two 3-letter alternatives, per PCFG (docs/lab.md)
_PRETERMINALS = ("g", "h", "i", "1e", "1g", "1i")
_LEVEL6 = (
    "2a 2b 2c | 2d 2e 2f ; 2h 2i 2j | 2k 2l 2m ; 2n 2o 2p | 2q 2r 2s ; 2t 2u 2v | 2w 2x 2y ; 2z 3a 3b | 3c 3d 3c ; 3b 3a 2z | 2y 2x 2w",
    "2v 2u 2t | 2s 2r 2q ; 2p 2o 2n | 2m 2l 2k ; 2j 2i 2h | 2g 2f 2e ; 2d 2c 2b | 2a 2c 2e ; 2g 2i 2k | 2m 2o 2q ; 2s 2u 2w | 2y 3a 3c",
    "3d 3b 2z | 2x 2w 2u ; 2s 2q 2o | 2m 2k 2i ; 2g 2e 2c | 2a 2d 2g ; 2j 2m 2p | 2s 2v 2y ; 3b 3a 2x | 2u 2r 2o ; 2l 2i 2f | 2c 2e 2i",
    "2m 2q 2u | 2y 3c 2z ; 2v 2r 2n | 2j 2f 2b ; 2f 2k 2p | 2u 2z 3c ; 2x 2s 2n | 2i 2d 2g ; 2m 2s 2y | 3c 2w 2q ; 2k 2e 2c | 2h 2o 2v",
)


def rules(variant: str, pcfg: int) -> dict[str, list[str]]:
    """The full rule set of one grammar as ``{nonterminal: [alternative, ...]}`` (readable form).

    Raises:
        ValueError: unknown variant or pcfg index outside 0..3.
    """
    if variant not in _CHANGES:
        raise ValueError(f"unknown grammar variant {variant!r}; known: {', '.join(VARIANTS)}")
    if not 0 <= int(pcfg) < N_PCFG:
        raise ValueError(f"pcfg index must be in 0..3 (0 is the paper's PCFG 1), got {pcfg}")
    out = {**_BASE, **_CHANGES[variant]}
    for nt, alts in zip(_PRETERMINALS, _LEVEL6[int(pcfg)].split(";")):
        out[nt] = [a.strip() for a in alts.split("|")]
    return out


def letters(variant: str, pcfg: int) -> set[int]:
    """Letter indices (0..29) that a grammar can emit (those reachable from ``v``)."""
    r = rules(variant, pcfg)
    seen, todo, out = set(), [START], set()
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        for alt in r[s]:
            for sym in alt.split():
                if sym in r:
                    todo.append(sym)
                else:
                    out.add(ID[sym] - LETTER0)
    return out


# every nonterminal of every variant, in a fixed order (ids shared by all compiled grammars)
NONTERMINALS: tuple[str, ...] = tuple(dict.fromkeys(
    [nt for v in VARIANTS for nt in {**_BASE, **_CHANGES[v]}] + list(_PRETERMINALS)))
assert len(NONTERMINALS) < TERMINAL0


class Compiled:
    """Flat integer arrays of all 24 grammars (see the module docstring)."""

    def __init__(self) -> None:
        G, N = len(VARIANTS) * N_PCFG, len(NONTERMINALS)
        nt_id = {nt: i for i, nt in enumerate(NONTERMINALS)}
        self.nt_first = np.zeros((G, N), dtype=np.int64)
        self.nt_nalt = np.zeros((G, N), dtype=np.int64)
        alt_first, alt_len, syms = [], [], []
        for vi, variant in enumerate(VARIANTS):
            for k in range(N_PCFG):
                g = vi * N_PCFG + k
                for nt, alts in rules(variant, k).items():
                    self.nt_first[g, nt_id[nt]] = len(alt_first)
                    self.nt_nalt[g, nt_id[nt]] = len(alts)
                    for alt in alts:
                        alt_first.append(len(syms))
                        rhs = alt.split()
                        alt_len.append(len(rhs))
                        syms.extend(nt_id[s] if s in nt_id else TERMINAL0 + ID[s] - LETTER0 for s in rhs)
        self.alt_first = np.asarray(alt_first, dtype=np.int64)
        self.alt_len = np.asarray(alt_len, dtype=np.int64)
        self.syms = np.asarray(syms, dtype=np.int64)
        self.start = nt_id[START]

    def arrays(self):
        return self.nt_first, self.nt_nalt, self.alt_first, self.alt_len, self.syms


@lru_cache(maxsize=1)
def compiled() -> Compiled:
    return Compiled()


def grammar_id(variant: str, pcfg: int) -> int:
    return VARIANTS.index(variant) * N_PCFG + int(pcfg)


@numba.njit(cache=True)
def expand(g, start, nt_first, nt_nalt, alt_first, alt_len, syms, out, stack):
    """Expand ``start`` of grammar ``g`` left to right into ``out`` (letter indices); returns the length.

    Uses numba's global RNG (seed it with ``np.random.seed`` inside njit code first).
    """
    sp = 0
    stack[0] = start
    sp = 1
    n = 0
    while sp > 0:
        sp -= 1
        s = stack[sp]
        if s >= TERMINAL0:
            out[n] = s - TERMINAL0
            n += 1
            continue
        a = nt_first[g, s] + np.random.randint(0, nt_nalt[g, s])
        f = alt_first[a]
        for i in range(alt_len[a] - 1, -1, -1):  # push reversed: leftmost symbol on top
            stack[sp] = syms[f + i]
            sp += 1
    return n


@numba.njit(cache=True)
def sample_text(g, start, nt_first, nt_nalt, alt_first, alt_len, syms, L, buf, stack, text):
    """Write a random length-``L`` window of a fresh sentence of grammar ``g`` into ``text[:L]``.

    The window start is uniform in [0, len - L - 1] (the fine-tuning generator's range, used for every
    stage; docs/lab.md). Returns the sentence length.
    """
    n = expand(g, start, nt_first, nt_nalt, alt_first, alt_len, syms, buf, stack)
    s0 = np.random.randint(0, n - L)  # randint's high is exclusive: s0 <= n - L - 1
    for i in range(L):
        text[i] = buf[s0 + i]
    return n


@numba.njit(cache=True)
def _sample_lengths(seed, g, start, nt_first, nt_nalt, alt_first, alt_len, syms, n):
    np.random.seed(seed)
    buf = np.empty(MAX_SENTENCE, dtype=np.int64)
    stack = np.empty(MAX_STACK, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = expand(g, start, nt_first, nt_nalt, alt_first, alt_len, syms, buf, stack)
    return out


@numba.njit(cache=True)
def _sample_texts(seed, g, start, nt_first, nt_nalt, alt_first, alt_len, syms, n, lmin, lmax):
    np.random.seed(seed)
    buf = np.empty(MAX_SENTENCE, dtype=np.int64)
    stack = np.empty(MAX_STACK, dtype=np.int64)
    text = np.empty(lmax, dtype=np.int64)
    out = np.full((n, lmax), -1, dtype=np.int64)
    for i in range(n):
        L = np.random.randint(lmin, lmax + 1)
        sample_text(g, start, nt_first, nt_nalt, alt_first, alt_len, syms, L, buf, stack, text)
        out[i, :L] = text[:L]
    return out


def sentence_lengths(variant: str, pcfg: int, n: int, seed: int = 0) -> np.ndarray:
    """Lengths of ``n`` full sentences (int64 [n]); for checking the grammars against docs/lab.md."""
    c = compiled()
    return _sample_lengths(np.uint32(seed), grammar_id(variant, pcfg), c.start, *c.arrays(), int(n))


def sample_texts(variant: str, pcfg: int, n: int, seed: int = 0, lmin: int = 25, lmax: int = 35) -> np.ndarray:
    """``n`` text windows (letter indices, int64 [n, lmax], -1 beyond each window's length L ~ U{lmin..lmax})."""
    c = compiled()
    rules(variant, pcfg)
    return _sample_texts(np.uint32(seed), grammar_id(variant, pcfg), c.start, *c.arrays(), int(n), int(lmin), int(lmax))
