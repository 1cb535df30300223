"""The lab's one 59-token vocabulary (docs/lab.md).

Token ids are fixed: checkpoints, cached data and the operator table all index by them.
"""

from __future__ import annotations

from collections.abc import Iterable

# fmt: off
_LETTERS = tuple(f"2{c}" for c in "abcdefghijklmnopqrstuvwxyz") + ("3a", "3b", "3c", "3d")
TOKENS: tuple[str, ...] = (
    "(", ")", "[", "]", "{", "}", "?", "!", "@", "£",   # 0-9   base operators; "(" is the identity
    "+", "^", "r1", "r2", "r3", "r4",                  # 10-15 duplicates: + ^ = "(", r1 r2 = ")", r3 r4 = "["
    ">", "$", "%", "*", "#", "*^",                     # 16-21 EOT BOS EOS SOT PAD STOP
) + _LETTERS + (                                       # 22-51 the 30 letters (PCFG terminals)
    "ex1", "ex2",                                      # 52-53 null-output operators (pretraining only)
    "dup1", "dup2", "dup3", "dup4", "dup5",             # 54-58 duplicates of { } ? ! @
)
# fmt: on

IDENTITY = 0      # the operator "(": maps every letter to itself
EOT = 16          # ">": end of text, the outputs follow
BOS = 17          # "$"
EOS = 18          # "%"
SOT = 19          # "*": start of text
PAD = 20          # "#": padding, and the loss ignore_index
STOP = 21         # "*^": closes each output block
LETTER0 = 22      # id of letter "2a"; letter index j has id LETTER0 + j
N_LETTERS = 30
EX1 = 52
EX2 = 53
DUP0 = 54         # id of "dup1"
VOCAB_SIZE = 59
SEQ_LEN = 160     # stored sample length
CTX = 159         # model context: x = seq[:-1], y = seq[1:]
N_OPS = 4         # operator slots per sample

ID = {tok: i for i, tok in enumerate(TOKENS)}

assert len(TOKENS) == VOCAB_SIZE and TOKENS[LETTER0] == "2a" and TOKENS[LETTER0 + N_LETTERS - 1] == "3d"
assert TOKENS[EX1] == "ex1" and TOKENS[DUP0] == "dup1"


def decode(ids: Iterable[int], *, collapse_pad: bool = False) -> str:
    """Space-separated token strings of ``ids``.

    Args:
        ids: token ids (any iterable of ints, e.g. a uint8 row).
        collapse_pad: write a run of k > 1 PAD tokens as ``#×k``.

    Raises:
        ValueError: an id outside [0, 59).
    """
    out: list[str] = []
    run = 0
    for t in ids:
        t = int(t)
        if not 0 <= t < VOCAB_SIZE:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {VOCAB_SIZE})")
        if collapse_pad and t == PAD:
            run += 1
            continue
        if run:
            out.append("#" if run == 1 else f"#×{run}")
            run = 0
        out.append(TOKENS[t])
    if run:
        out.append("#" if run == 1 else f"#×{run}")
    return " ".join(out)


def encode(text: str) -> list[int]:
    """Inverse of :func:`decode` (without PAD collapsing). Raises ValueError naming an unknown token."""
    try:
        return [ID[tok] for tok in text.split()]
    except KeyError as e:
        raise ValueError(f"unknown token {e.args[0]!r}; the vocabulary is {' '.join(TOKENS)}") from None
