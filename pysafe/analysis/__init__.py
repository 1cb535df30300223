"""The mechanistic analyses of the paper (docs/analyses.md): activation capture and the figures built on it.

- :mod:`pysafe.analysis.capture`: hook points and position selectors, pooled features of lab models;
- :mod:`pysafe.analysis.clusters`: Fig 3 (safe / unsafe clusters, where jailbreaks land) and the
  activation half of Fig 7 (attacked inputs), with exact distances from :mod:`pysafe.distances`.
"""
