"""The error every bad config value raises, and the helpers that word it (no third-party imports)."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config that does not validate; the message names the key and the fix."""


def raise_first_failure(checks: list[tuple[bool, str, str]]) -> None:
    """``checks`` are (ok, key, why); raise ConfigError("key: why.") for the first that is not ok."""
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}.")


def closest_hint(key: str, options: list[str], prefix: str = "") -> str:
    """" Did you mean '...'?" for the option closest to ``key``, else the list of valid ones."""
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if match:
        return f" Did you mean '{prefix}{match[0]}'?"
    return f" Valid keys here: {', '.join(prefix + o for o in sorted(options))}."
