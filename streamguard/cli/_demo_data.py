"""The bundled answer that ``streamguard demo`` streams offline.

An ordinary assistant answer (a short story) with one passage the offline profanity classifier
(``LocalModerator``) catches: a character swears angrily once. Every other window of it scores
well below the classifier's 0.5 threshold, with the default policy and with smaller windows.
"""

from __future__ import annotations

import re

__all__ = ["DEMO_KEYWORDS", "DEMO_MODEL", "DEMO_PROMPT", "DEMO_ANSWER", "word_deltas"]

DEMO_MODEL = "gpt-4o-mini"
DEMO_PROMPT = "Write a short story about a lighthouse keeper."
# What ``--moderator keyword`` flags in the demo (the words of the angry passage).
DEMO_KEYWORDS = ("bastard", "damn")

DEMO_ANSWER = """\
Here is a short story about a lighthouse keeper, as you asked.

Maren had kept the Skerry Point light for eleven winters. Every evening she climbed the one hundred \
and twelve steps, trimmed the wick, wound the clockwork and wrote the weather in a ledger that nobody \
but the inspector ever read.

One November night the fog came in so thick that the beam seemed to stop a few yards from the glass. \
She heard a ship's horn far too close, then the grinding of a hull on the outer rocks. Her assistant, \
Tobias, burst through the door, soaked and furious. "You stupid bastard, you let the damn lamp go \
dark!" he shouted, though the lamp was burning as bright as ever.

Maren did not argue. She handed him a lantern, took the signal rockets from their crate and led him \
down to the landing. Together they fired three rockets into the fog, and the ship answered with two \
long blasts as it backed off the rocks and turned for open water.

In the morning the captain rowed ashore with a bag of oranges and an apology for his charts. Tobias \
apologised too, quietly, while they were painting the railings. Maren wrote one line in the ledger: \
fog, ship safe, oranges.

If you would like, I can make the story longer, change the setting, or write it for younger readers."""


def word_deltas(text: str) -> list[str]:
    """Split ``text`` into deltas the way a model streams it: each word with the space before it."""
    return re.findall(r"\s*\S+", text) or [text]
