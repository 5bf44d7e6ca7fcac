"""cascade: few-shot image classification with a routed cascade of pretrained CLIP models, in Jittor.

Data flow (one obvious place for each step):
    data.py (layout, sampling, decoding) -> features.py (one cache per backbone) -> stages/ (fitted on support)
    -> router/ (who sees which query, how scores combine) -> output.py (result file, routes CSV, reports).
Jittor is configured by cascade.runtime before any model code imports it.
"""
__version__ = "0.1.0"
