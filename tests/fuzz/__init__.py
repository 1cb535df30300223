"""Differential fuzzing of the safetensors reader against the ``safetensors`` library.

``gen`` builds seeded cases, ``oracle`` judges one file, ``campaign`` runs many in child processes
with timeouts (``python tests/fuzz/campaign.py --cases 100000 --seed 1``); ``tests/test_fuzz.py``
runs a few thousand in CI.
"""
