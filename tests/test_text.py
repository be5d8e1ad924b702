import pytest
from voxloop.core.text import ALPHABET, is_normalized, normalize_text, spell_out


def test_alphabet_is_space_apostrophe_and_lowercase_letters():
    assert ALPHABET == " 'abcdefghijklmnopqrstuvwxyz"


def test_case_and_punctuation_are_removed():
    assert normalize_text("Hello, World!  How are you?") == "hello world how are you"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I have 21 apples", "i have twenty one apples"),
        ("pi is 3.14", "pi is three point one four"),
        ("it costs 3.05", "it costs three point zero five"),
        ("1,000,000 people", "one million people"),
        ("in 1984", "in one thousand nine hundred and eighty four"),
        ("agent 007", "agent zero zero seven"),
    ],
)
def test_numbers_are_spelled_out(text, expected):
    assert normalize_text(text) == expected


def test_ordinals_are_spelled_out():
    assert normalize_text("the 1st, 2nd, 3rd and 22nd") == "the first second third and twenty second"


def test_percent_ampersand_and_dollars_become_words():
    assert normalize_text("50% off") == "fifty percent off"
    assert normalize_text("salt & pepper") == "salt and pepper"
    assert normalize_text("$5") == "five dollars"
    assert normalize_text("$1") == "one dollar"
    assert normalize_text("$12.50") == "twelve dollars and fifty cents"


def test_accents_are_stripped():
    assert normalize_text("Café naïve résumé Ångström") == "cafe naive resume angstrom"


def test_hyphens_and_slashes_separate_words():
    assert normalize_text("well-known and/or rock\u2014roll") == "well known and or rock roll"


def test_apostrophes_survive_only_inside_words():
    assert normalize_text("Don\u2019t say 'hello' to the students' dog's bone") == (
        "don't say hello to the students dog's bone"
    )


def test_characters_outside_the_alphabet_are_dropped():
    assert normalize_text("x \u65e5\u672c y \u00a9 z") == "x y z"


@pytest.mark.parametrize("text", ["", "   \t\n", "!!! ... ???", "\u65e5\u672c\u8a9e", "'"])
def test_unspeakable_text_normalizes_to_empty(text):
    assert normalize_text(text) == ""


@pytest.mark.parametrize(
    "text",
    ["Hello, World!", "The 3rd of 12 items costs $4.99 (50% off)", "Don't 'quote' me -- ok?", "a/b\\c_d"],
)
def test_normalization_is_idempotent_and_recognized(text):
    normalized = normalize_text(text)
    assert normalize_text(normalized) == normalized
    assert is_normalized(normalized)
    assert set(normalized) <= set(ALPHABET)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello world", True),
        ("don't stop", True),
        ("", True),
        ("Hello world", False),
        ("hello  world", False),
        (" hello", False),
        ("hello ", False),
        ("'quoted'", False),
        ("twenty-one", False),
        ("21", False),
    ],
)
def test_is_normalized_accepts_only_normalized_transcripts(text, expected):
    assert is_normalized(text) is expected


def test_spell_out_keeps_punctuation_for_the_synthesizer():
    assert spell_out("Wait, 2 minutes!").split() == ["Wait,", "two", "minutes!"]


def test_an_ungrouped_run_of_five_or_more_digits_is_read_digit_by_digit_and_a_grouped_one_as_a_number():
    # Whisper writes digits read one by one as one run ("two nine three four zero" -> "29340").
    assert normalize_text("29340") == "two nine three four zero"
    assert normalize_text("room 40215b") == "room four zero two one five b"
    assert normalize_text("29,340") == "twenty nine thousand three hundred and forty"
    assert normalize_text("1999") == "one thousand nine hundred and ninety nine"
    assert normalize_text("$12345") == "twelve thousand three hundred and forty five dollars"
    assert normalize_text("12345.67") == "twelve thousand three hundred and forty five point six seven"


def test_the_titles_a_recognizer_abbreviates_are_spelled_as_spoken():
    assert normalize_text("Mr. John Dashwood") == "mister john dashwood"
    assert normalize_text("Mrs Smith and Dr. Who") == "missus smith and doctor who"
    assert normalize_text("drive the mr") == "drive the mister"
    assert normalize_text(normalize_text("Dr. Mr. Mrs.")) == normalize_text("Dr. Mr. Mrs.")
