"""Runtime code copied verbatim into each bundle's ``scripts/`` package.

Only what MONAI lacks lives here. Modules must not import ``autoplan``: a bundle is self-contained.
"""
