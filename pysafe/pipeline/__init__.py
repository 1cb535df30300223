"""End-to-end runs over the lab, the engine and the analyses: ``reproduce`` (everything from scratch at a
preset's scale) and ``demo`` (the cheap part of it on the shipped checkpoints). The top layer: it may
import every other part of pysafe, and nothing below it imports it (docs/architecture.md)."""
