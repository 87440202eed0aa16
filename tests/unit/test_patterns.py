from promptq.patterns import longest_match


def test_the_longest_matching_pattern_wins_whatever_the_order():
    patterns = ["claude-*", "claude-opus-4*", "claude-opus-4-5*"]
    assert longest_match(patterns, "claude-opus-4-5-20251101") == "claude-opus-4-5*"
    assert longest_match(reversed(patterns), "claude-opus-4-5-20251101") == "claude-opus-4-5*"
    assert longest_match(patterns, "claude-opus-4-20250514") == "claude-opus-4*"
    assert longest_match(patterns, "claude-sonnet-4") == "claude-*"


def test_a_longer_pattern_that_does_not_match_is_ignored():
    assert longest_match(["claude-*", "claude-sonnet-4-5-2025*"], "claude-sonnet-4-6") == "claude-*"


def test_between_equally_long_matches_the_first_given_wins():
    assert longest_match(["claude-?", "claude-*"], "claude-x") == "claude-?"
    assert longest_match(["claude-*", "claude-?"], "claude-x") == "claude-*"


def test_no_matching_pattern_gives_none():
    assert longest_match(["claude-*", "gpt-4o"], "gemini-pro") is None
    assert longest_match([], "claude-opus-4") is None


def test_matching_is_case_sensitive():
    assert longest_match(["Claude-*"], "claude-opus-4") is None
    assert longest_match(["claude-*"], "CLAUDE-OPUS-4") is None


def test_a_pattern_without_wildcards_matches_only_that_exact_model():
    assert longest_match(["claude-opus-5"], "claude-opus-5") == "claude-opus-5"
    assert longest_match(["claude-opus-5"], "claude-opus-5-5") is None


def test_character_classes_work_as_in_the_shell():
    # The built-in price table relies on this to keep point releases out of a family.
    patterns = ["claude-opus-5-[!0-9]*"]
    assert longest_match(patterns, "claude-opus-5-thinking") == "claude-opus-5-[!0-9]*"
    assert longest_match(patterns, "claude-opus-5-7") is None


def test_any_iterable_of_patterns_is_accepted_even_one_that_can_be_read_only_once():
    patterns = (pattern for pattern in ["a*", "ab*", "abc*"])
    assert longest_match(patterns, "abcd") == "abc*"
    assert longest_match({"x*": 1, "xy*": 2}, "xyz") == "xy*"
