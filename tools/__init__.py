"""Command-line tools that work on what the bundles produce, each run as ``python tools/NAME.py`` from the repository
root (``--help`` on every one), e.g. ``evaluate.py`` (nnU-Net's summary.json plus HD95/NSD) and ``export.py``
(reproducible bundle zips and their safe installation)."""
