"""autoplan: nnU-Net v2's self-configuration (fingerprint, planner) re-expressed for MONAI Bundles.

The pipeline flows through one module per stage:
``dataset`` (layout, dataset.json) -> ``verify`` (integrity checks) -> ``fingerprint`` -> ``planner``
(with ``topology`` for the network shape) -> bundles (a later stage).
This package import stays light: heavy dependencies are imported by the stage that needs them.
"""

__version__ = "0.1.0"
