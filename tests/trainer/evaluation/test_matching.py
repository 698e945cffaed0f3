"""Reply parsing against a table of tricky replies (expected values worked out by hand from
VLMEvalKit's exact-matching rules)."""

import pytest

from trainer.evaluation.matching import parse_choice, parse_yes_no

OPTIONS = {"A": "cat", "B": "dog", "C": "red car", "D": "two"}

CHOICES = [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B. dog", "B"),
    ("B: dog", "B"),
    ("[D]", "D"),
    ("**C**", "C"),
    ("C.\n", "C"),
    ("A", "A"),
    ("It's C", "C"),
    ("Answer: D", "D"),
    ("D, two", "D"),
    ("The answer is B", "B"),
    ("The answer is (C).", "C"),
    ("The answer is b", "B"),  # the verbose form ignores case
    # letter far from the end: only the "answer is X" form rescues it
    ("The correct answer is **B**. Here's why: the animal barks at the mailman every day", "B"),
    ("B is correct because the animal in the image is clearly barking at the mailman", None),
    ("dog", "B"),  # option text alone
    ("DOG", "B"),  # option text in any case
    ("Red Car", "C"),
    ("c) red car", "C"),  # lower-case letter is not a letter; the text is
    ("I think it's a cat", "A"),  # 'a' (lower) is not option A; the text 'cat' is
    ("twofold", "D"),  # text match is substring match, as in VLMEvalKit
    ("two dogs", None),  # two option texts
    ("cat and dog", None),
    ("A or B", None),  # two letters
    ("(A) cat (B) dog", None),
    ("  b  ", None),
    ("", None),
    ("Option E", None),  # not an option letter
    ("E", None),
    ("H", None),
    ("Z", None),
    ("1", None),
    ("Cannot determine the answer: dog", None),  # refusal wins over the option text
    ("Sorry, I can't help with images of people yet. B", None),
]


@pytest.mark.parametrize(("reply", "expected"), CHOICES)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, OPTIONS) == expected


def test_table_is_big_enough():
    assert len(CHOICES) >= 30


def test_letter_must_be_an_option_present_in_the_row():
    assert parse_choice("C", {"A": "x", "B": "y"}) is None
    assert parse_choice("C", {"A": "x", "B": "y", "C": "z"}) == "C"


YES_NO = [
    ("Yes", "Yes"),
    ("No.", "No"),
    ("YES", "Yes"),
    ("yes.", "Yes"),
    ("Yes!", "Yes"),
    ("(yes)", "Yes"),
    ("yes, there is a dog", "Yes"),
    ("No, there is no dog.", "No"),
    ("No, no, no", "No"),
    ("The answer is no", "No"),
    ("No way", "No"),
    ("There is a yes-man", "Yes"),  # '-' against words splits them
    ("Yes and no", None),
    ("yes,no", None),
    ("Nope", None),
    ("Not sure", None),
    ("know", None),
    ("I don't know", None),
    ("", None),
]


@pytest.mark.parametrize(("reply", "expected"), YES_NO)
def test_parse_yes_no(reply, expected):
    assert parse_yes_no(reply) == expected
