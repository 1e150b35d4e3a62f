"""Serving an adapting model: deployment metrics (:mod:`tta.serve.metrics`, Prometheus) and a
recipe on Ray Serve with request batching (:mod:`tta.serve.ray_serve`).

Nothing here is imported by ``import tta``; each module imports its library (``prometheus_client``,
``ray``) itself, with an ``ImportError`` naming the extra (``pip install "tta-toolkit[prometheus]"``,
``[serve]``) when it is missing.
"""
