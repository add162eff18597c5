"""What the tools' command lines share: fire under the name they were called by, ``evaluate.py`` (as
``python tools/evaluate.py``) or ``autoplan evaluate``."""


def fire_as(prog: str, component, argv) -> None:
    """``fire.Fire(component, argv)`` with help and usage naming ``prog``; fire would print a name with spaces quoted,
    so the words after the first become command levels."""
    import fire

    first, *levels = prog.split()
    for word in reversed(levels):
        component = {word: component}
    fire.Fire(component, command=[*levels, *argv], name=first)
