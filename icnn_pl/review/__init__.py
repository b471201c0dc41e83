"""Review of finished reconstructions: scores against the true images (``metrics``), the
fit in feature space (``feature_fit``), run directories read back (``runs``), comparisons of
runs (``compare``) and pictures (``gallery``). ``python -m icnn_pl.evaluate`` is its CLI."""
