"""Exceptions the engine raises on purpose (as opposed to bugs)."""


class GenerationCancelled(Exception):
    """The caller's cancel callback asked to stop; raised before the next model evaluation."""
