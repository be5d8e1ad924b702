"""Transcript normalization shared by training and serving.

A normalized transcript is lowercase a-z words separated by single spaces, with apostrophes only
inside words ("don't"). Numbers and a few symbols are spelled out so that what a synthesizer
reads, what the model emits and what a user types as a correction can be compared word by word.
No torch here: the server imports this to validate corrections.
"""

from __future__ import annotations

import re
import unicodedata

from num2words import num2words

ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"
"""Every character a normalized transcript may contain (space, apostrophe, a-z)."""

# Longer digit runs (phone numbers, serials) are read digit by digit rather than as cardinals.
_MAX_CARDINAL_DIGITS = 12
# So are runs of five or more digits written without thousands separators, amounts aside: codes and
# numbers read one digit at a time, as a recognizer writes them ("two nine three four zero" -> 29340);
# an amount that large is written grouped ("29,340") and stays a cardinal.
_UNGROUPED_DIGIT_RUN = re.compile(r"(?<![\d,.$])\d{5,}(?![\d,]|\.\d)")
# Titles a recognizer abbreviates and a speaker says in full.
_TITLES = {"mr": "mister", "mrs": "missus", "dr": "doctor"}
_TITLE = re.compile(r"\b(" + "|".join(_TITLES) + r")\b")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u2032": "'"})
_GROUPED_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_DOLLARS = re.compile(r"\$\s?(\d+)(?:\.(\d{2}))?(?!\d)")
_PERCENT = re.compile(r"(?<=\d)\s?%")
# (?<!\d): a match can only start where a digit run starts; without it a long digit run costs
# quadratic time (each position inside the run is tried and fails at the run's end).
_ORDINAL = re.compile(r"(?<!\d)(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DECIMAL = re.compile(r"(?<!\d)(\d+)\.(\d+)")
_INTEGER = re.compile(r"\d+")
_WORD_INTERNAL_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")
_NORMALIZED = re.compile(r"(?:[a-z]+(?:'[a-z]+)*(?: [a-z]+(?:'[a-z]+)*)*)?")


def _integer_words(digits: str) -> str:
    if len(digits) > _MAX_CARDINAL_DIGITS or (len(digits) > 1 and digits.startswith("0")):
        return " ".join(_DIGIT_WORDS[int(d)] for d in digits)
    return num2words(int(digits))


def _ordinal_words(digits: str) -> str:
    # Past _MAX_CARDINAL_DIGITS the digits are read one by one, as for cardinals: num2words raises
    # OverflowError past 10^30, and int() refuses more than 4300 digits.
    if len(digits) > _MAX_CARDINAL_DIGITS:
        return _integer_words(digits)
    return num2words(int(digits), to="ordinal")


def _dollars_words(match: re.Match[str]) -> str:
    dollars, cents = match.group(1), match.group(2)
    words = f"{_integer_words(dollars)} {'dollar' if dollars == '1' else 'dollars'}"
    if cents and int(cents):
        words += f" and {_integer_words(str(int(cents)))} {'cent' if cents == '01' else 'cents'}"
    return f" {words} "


def spell_out(text: str) -> str:
    """Replace numbers and the symbols $ % & with words, leaving all other characters alone.

    Used on its own to prepare synthesizer input (punctuation kept, so prosody survives) that
    reads exactly like the normalized transcript: `normalize_text` applies the same step.
    """
    text = _UNGROUPED_DIGIT_RUN.sub(lambda m: " " + " ".join(_DIGIT_WORDS[int(d)] for d in m.group(0)) + " ", text)
    text = _GROUPED_THOUSANDS.sub("", text)
    text = _DOLLARS.sub(_dollars_words, text)
    text = _PERCENT.sub(" percent ", text)
    text = text.replace("&", " and ")
    text = _ORDINAL.sub(lambda m: f" {_ordinal_words(m.group(1))} ", text)
    text = _DECIMAL.sub(
        lambda m: (
            f" {_integer_words(m.group(1))} point " + " ".join(_DIGIT_WORDS[int(d)] for d in m.group(2)) + " "
        ),
        text,
    )
    return _INTEGER.sub(lambda m: f" {_integer_words(m.group(0))} ", text)


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _separates_words(char: str) -> bool:
    # Punctuation, separators and control characters split words ("end.Next", "a,b", tabs);
    # anything else outside the alphabet (symbols, other scripts) is simply dropped.
    return unicodedata.category(char)[0] in "PZC"


def normalize_text(text: str) -> str:
    """The normalized transcript of `text`; "" when nothing in it is speakable.

    Lowercases, strips accents, spells out numbers ("21st" -> "twenty-first" -> "twenty first"; an
    ungrouped run of five or more digits digit by digit) and the titles Mr, Mrs and Dr,
    "%" and "&" and "$5", turns punctuation (hyphens and slashes included) into word breaks,
    keeps apostrophes only inside words, drops every other character outside `ALPHABET`, and
    collapses whitespace. Idempotent: normalize_text(normalize_text(t)) == normalize_text(t).
    """
    text = _strip_accents(text).translate(_APOSTROPHES)
    text = _TITLE.sub(lambda m: _TITLES[m.group(1)], spell_out(text).lower())
    chars = []
    for char in text:
        if char in ALPHABET:
            chars.append(char)
        elif _separates_words(char):
            chars.append(" ")
    text = _WORD_INTERNAL_APOSTROPHE.sub(" ", "".join(chars))
    return " ".join(text.split())


def is_normalized(text: str) -> bool:
    """Whether `text` is already a normalized transcript (the empty string counts as one)."""
    return _NORMALIZED.fullmatch(text) is not None
