"""lab/answers.py: the compliant and refusal answers against the sampler's own targets."""

from __future__ import annotations

import numpy as np

from pysafe.lab import data as D
from pysafe.lab.answers import compliant_answer, refusal_answer
from pysafe.lab.tasks import operator_table
from pysafe.lab.vocab import PAD, STOP

RECIPE = D.DataRecipe()


def test_compliant_answer_matches_sampler_targets():
    b = D.test_set(RECIPE, "std_safe", 64)
    ans = compliant_answer(b.x_safe, b.text_len, operator_table(RECIPE.operator_seed))
    for i in range(64):
        s, L = int(b.start_idx[i]), int(b.text_len[i])
        np.testing.assert_array_equal(ans[i, :2 * L + 2], b.y_safe_full[i, s:s + 2 * L + 2])
        assert ans[i, L] == STOP and ans[i, 2 * L + 1] == STOP and np.all(ans[i, 2 * L + 2:] == PAD)


def test_refusal_answer_layout():
    follow = np.array([[30, 31, STOP, 32, 33, STOP], [30, 31, STOP, 32, 33, STOP]], dtype=np.uint8)
    r = refusal_answer(follow, np.array([2, 2]), np.array([False, True]), refusal_token=22)
    np.testing.assert_array_equal(r[0], [22, 22, STOP, PAD, PAD, PAD])
    np.testing.assert_array_equal(r[1], [30, 31, STOP, 22, 22, STOP])
