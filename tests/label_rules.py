"""Labelling rules the label tests name as `label_rules:<function>` (a labeller is `module:function`)."""


def shorter(prompt: str, response: str, row: dict) -> float:
    """Shorter answers are better (any finished answer scores above a cut-off one, which scores 0)."""
    return 1.0 / (1 + len(response))


def longer(prompt: str, response: str, row: dict) -> float:
    return float(1 + len(response))
