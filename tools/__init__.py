"""Commands that work on what the bundles produce, run as ``autoplan NAME`` (``--help`` on every one), or as
``python tools/FILE.py`` with the project installed: ``evaluate`` (nnU-Net's summary.json plus HD95/NSD),
``ensemble`` (predict with or average several bundles, and make one ensemble bundle), ``select`` in ``find_best.py``
(nnU-Net's find_best_configuration with postprocessing) and ``export`` (reproducible bundle zips and their safe
installation)."""
