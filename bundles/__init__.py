"""Bundle templates and the runtime code (``bundles/scripts``) that ships inside every emitted bundle.

Both are found beside this file, so the paths hold in a checkout and in an installed package alike.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
TEMPLATES = _HERE / "templates"
SCRIPTS = _HERE / "scripts"
