"""Test and demo fixtures: a tiny random-weight model in the public layout (not engine code)."""
