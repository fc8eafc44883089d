"""Foundations every layer may use: validated config dataclasses (`config`), safetensors + JSON artifacts with
verified checksums (`artifacts`), the per-class `FeatureStats` accumulators and the class convention
(`feature_stats`), content digests of input files and folders (`digests`), cache paths, the version, and
which torch.distributed rank this is with the few collectives the pipeline uses (`distributed`).

May import: nothing from sails_fast (torch, safetensors and the standard library only).
"""
