"""Checking what a merge did, with code that does not share the merge's math: probes and runs, per-
layer checks against PEFT's own layers, the whole-model check, the checkpoint oracle, and the typed
reports."""
