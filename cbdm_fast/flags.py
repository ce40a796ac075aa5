"""What the command lines share in checking their flags: each check stops argparse with a usage error
(exit status 2) whose message names the flag and the value given."""
from __future__ import annotations

import argparse


def require_at_least(parser: argparse.ArgumentParser, *checks: tuple) -> None:
    """parser.error for the first (flag, value, low) whose value is given (not None) and below ``low``."""
    for flag, value, low in checks:
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
