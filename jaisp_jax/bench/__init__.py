"""Benchmark harness: `python -m jaisp_jax.bench <command>` (see __main__ and docs/performance.md).

Modules: step (train-step timing, FLOPs, MFU), profile (where the step's time goes),
hardware (peak FLOP/s per device kind), configs (config files + overrides),
pipeline (input samples/s), matching (in-graph vs scipy assignment),
scaling (weak scaling, fsdp memory), models (parameters and FLOPs per variant).
"""
