"""Command-line tools that work on what the bundles produce, each run as ``python tools/NAME.py`` from the repository
root (``--help`` on every one): ``evaluate.py`` (nnU-Net's summary.json plus HD95/NSD), ``ensemble.py`` (predict with
or average several bundles, and make one ensemble bundle), ``select.py`` (nnU-Net's find_best_configuration with
postprocessing) and ``export.py`` (reproducible bundle zips and their safe installation)."""
