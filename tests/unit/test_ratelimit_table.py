from pathlib import Path

import pytest

from promptq.ratelimit.table import LimitsError, LimitTable, ModelLimits

CONTRACT = {"rpm": 50, "input_tpm": 30000, "output_tpm": 8000, "max_concurrency": 20}


def table(text: str, *, builtins: bool = True) -> LimitTable:
    return LimitTable.from_toml(text, source="limits.toml", builtins=builtins)


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "limits.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def figures(limits: ModelLimits) -> dict[str, object]:
    return {
        "rpm": limits.rpm,
        "input_tpm": limits.input_tpm,
        "output_tpm": limits.output_tpm,
        "max_concurrency": limits.max_concurrency,
    }


# --- the built-in table -------------------------------------------------------------------


def test_builtins_are_the_contracts_figures_for_claude_and_a_catch_all():
    builtins = LimitTable.load(None)
    assert [entry.pattern for entry in builtins.entries()] == ["*", "claude-*"]
    for entry in builtins.entries():
        assert figures(entry) == CONTRACT, entry.pattern
        assert entry.burst_seconds == 0.5


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        ("claude-sonnet-4-5-20250929", "claude-*"),
        ("claude-opus-4-1", "claude-*"),
        ("gpt-4o", "*"),
        ("Claude-Sonnet-4-5", "*"),  # matching is case-sensitive, as for prices
        ("", "*"),
    ],
)
def test_every_model_is_limited_by_some_builtin_entry(model, pattern):
    limits = LimitTable.load(None).limits_for(model)
    assert limits.pattern == pattern
    assert figures(limits) == CONTRACT


def test_an_empty_file_leaves_the_builtins():
    assert table("# nothing to change\n").entries() == LimitTable.load(None).entries()


# --- longest match and the "*" fallback ---------------------------------------------------


def test_the_longest_matching_pattern_wins():
    limits = table(
        '[models."claude-opus-4*"]\nrpm = 5\n[models."claude-opus-4-5*"]\nrpm = 7\n'
        '[models."claude-*"]\nrpm = 3\n'
    )
    assert limits.limits_for("claude-opus-4-5-20251101").rpm == 7
    assert limits.limits_for("claude-opus-4-1").rpm == 5
    assert limits.limits_for("claude-haiku-4-5").rpm == 3
    assert limits.limits_for("gemini-pro").rpm == 50


def test_a_model_no_file_pattern_matches_falls_back_to_the_catch_all():
    limits = table('[models."my-model"]\nrpm = 1\n[models."*"]\nrpm = 9\n')
    assert limits.limits_for("my-model").rpm == 1
    assert limits.limits_for("some-other-model").pattern == "*"
    assert limits.limits_for("some-other-model").rpm == 9
    assert limits.limits_for("claude-opus-4").rpm == 50  # the built-in claude-* still wins


def test_the_catch_all_loses_a_tie_with_a_pattern_as_long():
    # "*" and "m" are both one character long; longest_match gives a tie to the first.
    limits = table('[models."m"]\nrpm = 1\n[models."?"]\nrpm = 2\n[models."*"]\nrpm = 3\n')
    assert limits.limits_for("m").rpm == 1
    assert limits.limits_for("x").rpm == 2
    assert limits.limits_for("xy").rpm == 3


def test_entries_are_sorted_by_pattern():
    limits = table('[models."zz"]\nrpm = 1\n[models."aa"]\nrpm = 2\n')
    assert [entry.pattern for entry in limits.entries()] == ["*", "aa", "claude-*", "zz"]


# --- a file overriding, extending and inheriting ------------------------------------------


def test_a_file_overrides_a_builtin_and_keeps_the_rest(tmp_path):
    path = write(tmp_path, '[models."claude-*"]\nrpm = 4000\ninput_tpm = 2000000\n')
    limits = LimitTable.load(path)
    claude = limits.limits_for("claude-sonnet-4-5")
    assert (claude.rpm, claude.input_tpm) == (4000, 2_000_000)
    assert figures(limits.limits_for("gpt-4o")) == CONTRACT
    assert [entry.pattern for entry in limits.entries()] == ["*", "claude-*"]


def test_a_file_extends_the_builtins(tmp_path):
    path = write(tmp_path, '[models."my-local-model*"]\nrpm = 600\n')
    limits = LimitTable.load(str(path))
    assert limits.limits_for("my-local-model-7b").rpm == 600
    assert limits.limits_for("claude-haiku-4-5").pattern == "claude-*"


def test_a_left_out_key_inherits_from_the_builtin_of_the_same_pattern():
    limits = table(
        '[models."claude-*"]\noutput_tpm = 16000\n[models."*"]\nrpm = 1\ninput_tpm = 2\n'
    )
    claude = limits.limits_for("claude-opus-4")
    # From the built-in "claude-*", not from the file's "*".
    assert figures(claude) == {**CONTRACT, "output_tpm": 16000}


def test_a_left_out_key_of_a_new_pattern_inherits_from_the_files_catch_all():
    # The file's "*" comes after the entry that inherits from it: order does not matter.
    limits = table(
        '[models."gpt-*"]\nrpm = 100\n'
        '[models."*"]\ninput_tpm = 1000\nmax_concurrency = 3\nburst_seconds = 2\n'
    )
    gpt = limits.limits_for("gpt-4o")
    assert figures(gpt) == {
        "rpm": 100,
        "input_tpm": 1000,
        "output_tpm": 8000,  # the file's "*" left it out too: the built-in "*" value
        "max_concurrency": 3,
    }
    assert gpt.burst_seconds == 2.0


def test_a_left_out_key_of_a_new_pattern_inherits_from_the_builtin_catch_all():
    limits = table('[models."gpt-*"]\nmax_concurrency = 2\nburst_seconds = 1.5\n')
    gpt = limits.limits_for("gpt-4o")
    assert figures(gpt) == {**CONTRACT, "max_concurrency": 2}
    assert gpt.burst_seconds == 1.5
    assert isinstance(gpt.burst_seconds, float)


def test_an_integer_burst_is_read_as_seconds():
    limits = table('[models."m"]\nburst_seconds = 60\n')
    assert limits.limits_for("m").burst_seconds == 60.0


def test_token_meters_are_a_minute_deep_unless_a_file_says_otherwise():
    # As deep as the upstream's own token buckets, whatever the request smoothing.
    builtin = LimitTable.load(None).limits_for("claude-sonnet-4-6")
    assert (builtin.burst_seconds, builtin.token_burst_seconds) == (0.5, 60.0)
    assert builtin.count_cache_reads is False
    limits = table(
        '[models."*"]\ntoken_burst_seconds = 10\n'
        '[models."old-*"]\ncount_cache_reads = true\n'
        '[models."new-*"]\ntoken_burst_seconds = 2.5\n'
    )
    # Left out, both are inherited from the file's "*" like any other key.
    old = limits.limits_for("old-model")
    assert (old.token_burst_seconds, old.count_cache_reads) == (10.0, True)
    new = limits.limits_for("new-model")
    assert (new.token_burst_seconds, new.count_cache_reads) == (2.5, False)


def test_unlimited_switches_one_dimension_off():
    limits = table('[models."local-*"]\nrpm = "unlimited"\nmax_concurrency = "unlimited"\n')
    local = limits.limits_for("local-llama")
    assert (local.rpm, local.max_concurrency) == (None, None)
    assert (local.input_tpm, local.output_tpm) == (30000, 8000)


def test_unlimited_in_the_catch_all_is_inherited():
    limits = table('[models."*"]\noutput_tpm = "unlimited"\n[models."x-*"]\nrpm = 5\n')
    assert limits.limits_for("x-1").output_tpm is None
    assert limits.limits_for("x-1").rpm == 5
    assert limits.limits_for("claude-x").output_tpm == 8000  # its own built-in has a limit


def test_the_caps_themselves_are_allowed():
    limits = table('[models."m"]\nrpm = 1000000\nmax_concurrency = 10000\n')
    assert (limits.limits_for("m").rpm, limits.limits_for("m").max_concurrency) == (
        1_000_000,
        10_000,
    )


def test_without_builtins_only_the_file_counts():
    text = (
        '[models."*"]\nrpm = 10\ninput_tpm = 100\noutput_tpm = 10\nmax_concurrency = 1\n'
        '[models."m"]\nrpm = 2\n'
    )
    limits = table(text, builtins=False)
    assert [entry.pattern for entry in limits.entries()] == ["*", "m"]
    assert limits.limits_for("claude-opus-4").pattern == "*"
    assert figures(limits.limits_for("m")) == {
        "rpm": 2,
        "input_tpm": 100,
        "output_tpm": 10,
        "max_concurrency": 1,
    }
    assert limits.limits_for("m").burst_seconds == 0.5


# --- to_dict and direct construction ------------------------------------------------------


def test_to_dict_gives_every_field_with_none_for_unlimited():
    limits = table('[models."m"]\nrpm = "unlimited"\nburst_seconds = 0.25\n').limits_for("m")
    assert limits.to_dict() == {
        "pattern": "m",
        "rpm": None,
        "input_tpm": 30000,
        "output_tpm": 8000,
        "max_concurrency": 20,
        "burst_seconds": 0.25,
        "token_burst_seconds": 60.0,
        "count_cache_reads": False,
    }


def test_to_dict_of_a_builtin():
    assert LimitTable.load(None).limits_for("claude-opus-4").to_dict() == {
        "pattern": "claude-*",
        **CONTRACT,
        "burst_seconds": 0.5,
        "token_burst_seconds": 60.0,
        "count_cache_reads": False,
    }


def test_model_limits_validates_direct_construction():
    limits = ModelLimits("m", rpm=1, input_tpm=None, output_tpm=2, max_concurrency=3)
    assert limits.burst_seconds == 0.5 and limits.input_tpm is None
    with pytest.raises(LimitsError, match="rpm = 0"):
        ModelLimits("m", rpm=0, input_tpm=1, output_tpm=1, max_concurrency=1)
    with pytest.raises(LimitsError, match="output_tpm"):
        ModelLimits("m", rpm=1, input_tpm=1, output_tpm=1.5, max_concurrency=1)  # type: ignore[arg-type]
    with pytest.raises(LimitsError, match="burst_seconds"):
        ModelLimits("m", rpm=1, input_tpm=1, output_tpm=1, max_concurrency=1, burst_seconds=0)
    with pytest.raises(LimitsError, match="pattern"):
        ModelLimits("", rpm=1, input_tpm=1, output_tpm=1, max_concurrency=1)


def test_a_table_without_a_catch_all_is_refused():
    with pytest.raises(LimitsError, match=r'"\*"'):
        LimitTable([ModelLimits("m", rpm=1, input_tpm=1, output_tpm=1, max_concurrency=1)])


# --- errors: each names the file, the pattern and the field, and says what to do -----------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[models."m"]\nrpms = 3\n', ['"m"', "unknown key 'rpms'", "rpm, input_tpm"]),
        ('[models."m"]\nrpm = 0\n', ['"m"', "rpm = 0", "very small limit", "remove the model"]),
        ('[models."m"]\ninput_tpm = 0\n', ['"m"', "input_tpm = 0", "block every call"]),
        ('[models."m"]\noutput_tpm = -5\n', ['"m"', "output_tpm = -5", "negative"]),
        ('[models."m"]\nmax_concurrency = 0\n', ['"m"', "max_concurrency = 0", '"unlimited"']),
        ('[models."m"]\nrpm = 50.0\n', ['"m"', "rpm", "whole number", "rpm = 50"]),
        ('[models."m"]\ninput_tpm = 1.5\n', ['"m"', "input_tpm", "not a whole number"]),
        ('[models."m"]\nrpm = "50"\n', ['"m"', "rpm", "without quotes"]),
        ('[models."m"]\nrpm = "Unlimited"\n', ['"m"', "rpm", 'exactly "unlimited"']),
        ('[models."m"]\nrpm = true\n', ['"m"', "rpm", "true/false is not a number"]),
        ('[models."m"]\nmax_concurrency = false\n', ['"m"', "max_concurrency", "true/false"]),
        ('[models."m"]\noutput_tpm = [1]\n', ['"m"', "output_tpm", "whole number"]),
        ('[models."m"]\nrpm = 1000001\n', ['"m"', "rpm = 1000001", "likely a typo"]),
        (
            '[models."m"]\nmax_concurrency = 10001\n',
            ['"m"', "max_concurrency = 10001", "10,000", "likely a typo"],
        ),
        ('[models."m"]\nburst_seconds = 0\n', ['"m"', "burst_seconds = 0", "more than 0"]),
        ('[models."m"]\nburst_seconds = -1.0\n', ['"m"', "burst_seconds = -1.0", "more than 0"]),
        ('[models."m"]\nburst_seconds = 60.5\n', ['"m"', "burst_seconds = 60.5", "at most 60"]),
        ('[models."m"]\nburst_seconds = nan\n', ['"m"', "burst_seconds", "not a finite number"]),
        ('[models."m"]\nburst_seconds = inf\n', ['"m"', "burst_seconds", "not a finite number"]),
        ('[models."m"]\nburst_seconds = true\n', ['"m"', "burst_seconds", "number of seconds"]),
        ('[models."m"]\nburst_seconds = "1"\n', ['"m"', "burst_seconds", "without quotes"]),
        (
            '[models."m"]\nburst_seconds = "unlimited"\n',
            ['"m"', "burst_seconds", "cannot be unlimited"],
        ),
        (
            '[models."m"]\ntoken_burst_seconds = 0\n',
            ['"m"', "token_burst_seconds = 0", "more than 0"],
        ),
        (
            '[models."m"]\ntoken_burst_seconds = 61\n',
            ['"m"', "token_burst_seconds = 61", "at most 60"],
        ),
        (
            '[models."m"]\ntoken_burst_seconds = "unlimited"\n',
            ['"m"', "token_burst_seconds", "cannot be unlimited", "token_burst_seconds = 60"],
        ),
        (
            '[models."m"]\ncount_cache_reads = "yes"\n',
            ['"m"', "count_cache_reads must be true or false", "'yes'"],
        ),
        ('[models."m"]\ncount_cache_reads = 1\n', ['"m"', "count_cache_reads", "true or false"]),
        ('[model."m"]\nrpm = 3\n', ["unknown top-level key 'model'", "[models."]),
        ("rpm = 3\n", ["unknown top-level key 'rpm'"]),
        ("models = 3\n", ["'models' must be a table"]),
        ('[models]\n"m" = 3\n', ['"m"', "must be a table of limits"]),
        ('[models.""]\nrpm = 3\n', ["pattern is empty", '"*" for every model']),
        ("[models.claude-x-4.5]\nrpm = 3\n", ["unknown key '5'", "quote a pattern"]),
        ('[models."m"\nrpm = 3\n', ["not valid TOML", "fix the syntax"]),
        ('[models."m"]\nrpm = 3\nrpm = 4\n', ["not valid TOML"]),
    ],
)
def test_a_bad_file_is_refused_with_a_message_that_says_where_and_what(text, words):
    with pytest.raises(LimitsError) as info:
        table(text)
    message = str(info.value)
    assert message.startswith("limits.toml: ")
    assert all(word in message for word in words), message


def test_an_error_in_the_catch_all_names_it():
    with pytest.raises(LimitsError) as info:
        table('[models."*"]\nrpm = 0\n')
    assert str(info.value).startswith('limits.toml: [models."*"]: rpm = 0')


def test_without_builtins_the_file_needs_a_catch_all():
    with pytest.raises(LimitsError) as info:
        table(
            '[models."m"]\nrpm = 1\ninput_tpm = 1\noutput_tpm = 1\nmax_concurrency = 1\n',
            builtins=False,
        )
    message = str(info.value)
    assert message.startswith("limits.toml: ") and '[models."*"]' in message
    assert "still limited" in message


def test_without_builtins_the_catch_all_must_give_every_limit():
    with pytest.raises(LimitsError) as info:
        table('[models."*"]\nrpm = 1\ninput_tpm = 1\noutput_tpm = 1\n', builtins=False)
    message = str(info.value)
    assert '[models."*"]' in message and "'max_concurrency' is missing" in message
    assert 'max_concurrency = "unlimited"' in message


def test_the_same_errors_come_from_a_file_and_name_it(tmp_path):
    path = write(tmp_path, '[models."claude-opus-4*"]\nrpm = 50\noutput_tpm = -75\n')
    with pytest.raises(LimitsError) as info:
        LimitTable.load(path)
    message = str(info.value)
    assert str(path) in message and "claude-opus-4*" in message
    assert "output_tpm = -75" in message


def test_a_missing_file_is_an_error_that_names_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(LimitsError) as info:
        LimitTable.load(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message and "PROMPTQ_LIMITS_FILE" in message


def test_a_directory_is_not_a_limits_file(tmp_path):
    with pytest.raises(LimitsError, match="cannot read limits file"):
        LimitTable.load(tmp_path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = write(tmp_path, b'[models."m"]\nrpm = 3 # \xff\n')
    with pytest.raises(LimitsError, match="not UTF-8"):
        LimitTable.load(path)


def test_limits_error_is_a_value_error():
    assert issubclass(LimitsError, ValueError)


def test_the_readmes_limits_example_is_a_valid_file():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## Rate limits\n", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    entry = LimitTable.from_toml(example, source="README").limits_for("claude-x")
    assert (entry.rpm, entry.token_burst_seconds, entry.count_cache_reads) == (50, 60.0, False)
