"""Bundle templates and the runtime code (``bundles/scripts``) that ships inside every emitted bundle."""
