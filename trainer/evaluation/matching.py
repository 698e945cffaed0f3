"""Read a choice out of a model's raw reply: option letters and yes/no, by exact matching.

The rules follow VLMEvalKit's exact-matching path (`can_infer_option`, `can_infer_text`,
`YOrN_Extraction`), re-written here; there is no LLM judge. A reply that cannot be read gives
None, which scores as wrong (VLMEvalKit's 'Z'). Differences from VLMEvalKit are listed in
docs/eval.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["parse_choice", "parse_option_letter", "parse_option_text", "parse_yes_no"]

# Replies that refuse to answer: no choice (VLMEvalKit maps these to 'Z').
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# "The answer is B", "correct answer is **C**": a verbose answer whose letter is not near the end.
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([A-H])\**")
# A letter counts as the answer only among the last four words ("B. because ..." with a long
# explanation after it is not read, as in VLMEvalKit).
_LAST_WORDS = 4


def _refused(reply: str) -> bool:
    return any(r in reply for r in _REFUSALS)


def parse_option_letter(reply: str, options: Mapping[str, str]) -> str | None:
    """The option letter the reply names as a stand-alone word (`B`, `(B)`, `B.`, `B. a cat`).

    Exactly one of the option letters must appear as a word (case-sensitive, after
    punctuation becomes spaces), among the reply's last four words; otherwise the verbose form
    "answer is X" is tried.
    """
    if _refused(reply):
        return None
    words = reply.translate(_OPTION_PUNCT).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) >= len(words) - _LAST_WORDS:
        return named[0]
    m = _VERBOSE_ANSWER.search(reply)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def parse_option_text(reply: str, options: Mapping[str, str]) -> str | None:
    """The option whose text, in any case, is the only option text contained in the reply.

    Replies longer than twice the options' total text length are not read (a long reply
    mentions several options in passing).
    """
    text = reply.lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [letter for letter, value in options.items() if str(value).lower() in text]
    return hits[0] if len(hits) == 1 else None


def parse_choice(reply: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reply chooses (letter first, then option text), or None.

    A refusal ("Cannot determine the answer", ...) is no choice even if it names an option.
    """
    reply = str(reply)
    if _refused(reply):
        return None
    return parse_option_letter(reply, options) or parse_option_text(reply, options)


_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<")
_PUNCT += ("@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    # VQA-style normalisation: a mark written against a word ("yes,no") splits it, a mark set
    # off by a space ("Yes , it") is dropped; periods go except inside numbers.
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def parse_yes_no(reply: str) -> str | None:
    """'Yes' or 'No' when the reply holds exactly one of the words yes / no, else None."""
    words = _strip_punctuation(str(reply).lower()).split()
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return None
