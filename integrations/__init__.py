"""Deployment around hf_tensorizer: the KServe-protocol inference server, manifests, the cold-start benchmark.

Not part of the installed ``hf_tensorizer`` package; run from the repository root (``python -m
integrations.server ...``) or from the container image built by ``integrations/Dockerfile``.
"""
