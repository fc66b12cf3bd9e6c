"""The Fitzpatrick reporting groups: one mapping for the manifest, exports, metrics and plots.

Imports nothing (the CLI and the API's reports use it without the database). An image's group
comes from its skin type 1..6 when it has one, else from the group its source gave (DDI gives
only groups), else it is unknown. The SQL form of the same rule (datasets' manifest filter)
is built from these constants and tested against `fitzpatrick_group`.
"""

from __future__ import annotations

SKIN_TONE_GROUPS = ("I-II", "III-IV", "V-VI")
UNKNOWN_GROUP = "unknown"
# Every reporting group, in table order; "unknown" is missing data, not a skin tone.
FITZPATRICK_GROUPS = (*SKIN_TONE_GROUPS, UNKNOWN_GROUP)
GROUP_OF_TONE = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"}


def fitzpatrick_group(*, skin_tone: int | None, skin_tone_group: str | None = None) -> str:
    """The reporting group of an image: from skin_tone 1..6, else the group the source gave,
    else "unknown" (Fitzpatrick17k marks unlabelled tones -1)."""
    group = GROUP_OF_TONE.get(skin_tone) if skin_tone is not None else None
    if group is not None:
        return group
    return skin_tone_group if skin_tone_group in SKIN_TONE_GROUPS else UNKNOWN_GROUP
