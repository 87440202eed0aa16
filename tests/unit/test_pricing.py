from decimal import Decimal
from pathlib import Path

import pytest

from promptq.pricing import (
    Cost,
    ModelPrices,
    PriceTable,
    PricingError,
    cost_of,
    format_usd,
)
from promptq.usage import Usage

D = Decimal


def table(text: str) -> PriceTable:
    return PriceTable.from_toml(text, source="prices.toml")


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "prices.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- the built-in table -------------------------------------------------------------------

# Real model IDs (aliases, dated snapshots, CometAPI "-thinking" variants) and their list
# prices: (input, 5m cache write, 1h cache write, cache read, output) per million tokens.
LIST_PRICES = {
    "claude-fable-5-2": ("8", "10", "16", "0.2", "40"),
    "claude-fable-5-1": ("10", "12.5", "20", "0.25", "50"),
    "claude-fable-5-1-thinking": ("10", "12.5", "20", "0.25", "50"),
    "claude-fable-5": ("10", "12.5", "20", "1", "50"),
    "claude-fable-5-thinking": ("10", "12.5", "20", "1", "50"),
    "claude-mythos-5-1": ("10", "12.5", "20", "0.25", "50"),
    "claude-mythos-5": ("10", "12.5", "20", "1", "50"),
    "claude-mythos-5-thinking": ("10", "12.5", "20", "1", "50"),
    "claude-opus-5-5": ("4", "5", "8", "0.2", "20"),
    "claude-opus-5": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-5-thinking": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-4-8": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-4-7": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-4-6-thinking": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-4-5-20251101": ("5", "6.25", "10", "0.5", "25"),
    "claude-opus-4-1-20250805": ("15", "18.75", "30", "1.5", "75"),
    "claude-opus-4-20250514": ("15", "18.75", "30", "1.5", "75"),
    "claude-opus-4-0": ("15", "18.75", "30", "1.5", "75"),
    "claude-sonnet-5-5": ("2", "2.5", "4", "0.1", "10"),
    "claude-sonnet-5": ("2", "2.5", "4", "0.2", "10"),
    "claude-sonnet-5-thinking": ("2", "2.5", "4", "0.2", "10"),
    "claude-sonnet-4-6": ("3", "3.75", "6", "0.3", "15"),
    "claude-sonnet-4-5-20250929": ("3", "3.75", "6", "0.3", "15"),
    "claude-sonnet-4-20250514-thinking": ("3", "3.75", "6", "0.3", "15"),
    "claude-3-7-sonnet-20250219": ("3", "3.75", "6", "0.3", "15"),
    "claude-haiku-4-5-20251001": ("1", "1.25", "2", "0.1", "5"),
    "claude-3-5-haiku-20241022": ("0.8", "1", "1.6", "0.08", "4"),
    "claude-3-haiku-20240307": ("0.25", "0.3", "0.5", "0.03", "1.25"),
}


@pytest.mark.parametrize(("model", "expected"), LIST_PRICES.items())
def test_builtin_list_prices(model, expected):
    prices = PriceTable.load(None).prices_for(model)
    assert prices is not None, model
    got = (prices.input, prices.cache_write, prices.cache_write_1h, prices.cache_read)
    assert (*got, prices.output) == tuple(D(value) for value in expected)


def test_every_builtin_pattern_is_covered_by_the_list_above():
    builtins = PriceTable.load(None)
    used = {builtins.prices_for(model).pattern for model in LIST_PRICES}  # type: ignore[union-attr]
    assert used == set(builtins.patterns())


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "claude-haiku-5-5",  # priced by prompt length: no flat price is right
        "claude-mythos-5-2",  # price not confirmed
        "claude-opus-5-7",  # an unknown point release must not take Opus 5's price
        "claude-sonnet-5-7",
        "claude-fable-5-3",
        "cometapi-opus-4-5-20251101",
        "Claude-Sonnet-4-5",
    ],
)
def test_an_unknown_model_has_no_price_rather_than_a_wrong_one(model):
    assert PriceTable.load(None).prices_for(model) is None


def test_there_is_no_catch_all_pattern():
    assert not [
        pattern
        for pattern in PriceTable.load(None).patterns()
        if pattern in {"*", "claude*", "claude-*"}
    ]


def test_the_longest_builtin_pattern_wins():
    builtins = PriceTable.load(None)
    assert builtins.prices_for("claude-opus-4-5-20251101").pattern == "claude-opus-4-5*"  # type: ignore[union-attr]
    assert builtins.prices_for("claude-opus-4-20250514").pattern == "claude-opus-4*"  # type: ignore[union-attr]


# --- cost arithmetic ----------------------------------------------------------------------


def sonnet_4_5() -> ModelPrices:
    prices = PriceTable.load(None).prices_for("claude-sonnet-4-5-20250929")
    assert prices is not None
    return prices


def test_cost_of_sonnet_4_5_usage_is_exact():
    usage = Usage(
        input_tokens=1000,
        output_tokens=500,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=10_000,
    )
    cost = cost_of(usage, sonnet_4_5())
    assert (cost.input, cost.output, cost.cache_write, cost.cache_read) == (
        D("0.003"),
        D("0.0075"),
        D("0.0075"),
        D("0.003"),
    )
    assert cost.total == D("0.021")
    assert cost.to_api() == {
        "currency": "USD",
        "total": "0.021",
        "input": "0.003",
        "output": "0.0075",
        "cache_write": "0.0075",
        "cache_read": "0.003",
    }


def test_one_hour_cache_writes_are_billed_at_the_one_hour_price():
    # 600 five-minute writes at $3.75 and 400 one-hour writes at $6 per million.
    usage = Usage(cache_creation_input_tokens=1000, cache_creation_1h_input_tokens=400)
    cost = cost_of(usage, sonnet_4_5())
    assert cost.cache_write == D("0.00225") + D("0.0024")
    assert cost.to_api()["cache_write"] == "0.00465"


def test_one_hour_writes_read_from_a_message_reach_the_cost():
    message = {
        "usage": {
            "input_tokens": 0,
            "output_tokens": 0,
            "cache_creation_input_tokens": 1_000_000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 0,
                "ephemeral_1h_input_tokens": 1_000_000,
            },
        }
    }
    cost = cost_of(Usage.from_message(message), sonnet_4_5())
    assert cost.total == D(6)  # 2 x base input, not the 5-minute 1.25 x


def test_a_decimal_price_never_goes_through_a_float():
    prices = table('[models."m"]\ninput = 0.1\noutput = 0.2\n').prices_for("m")
    assert prices is not None
    cost = cost_of(Usage(input_tokens=1_000_000, output_tokens=1_000_000), prices)
    assert cost.total == D("0.3")  # 0.1 + 0.2 in binary floats is 0.30000000000000004
    assert cost.to_api()["total"] == "0.3"


def test_large_usage_is_exact_to_the_picodollar():
    entry = "input = 0.123457\noutput = 999.999999\ncache_write = 0\ncache_read = 0\n"
    prices = table(f'[models."m"]\n{entry}cache_write_1h = 0\n').prices_for("m")
    assert prices is not None
    cost = cost_of(Usage(input_tokens=987_654_321, output_tokens=123_456_789), prices)
    assert cost.input * 10**12 == 987_654_321 * 123_457
    assert cost.output * 10**12 == 123_456_789 * 999_999_999
    assert (cost.total * 10**12) % 1 == 0


def test_zero_usage_costs_zero():
    assert cost_of(Usage(), sonnet_4_5()).to_api() == {
        "currency": "USD",
        "total": "0",
        "input": "0",
        "output": "0",
        "cache_write": "0",
        "cache_read": "0",
    }


def test_a_tiny_cost_has_no_exponent():
    haiku_3 = PriceTable.load(None).prices_for("claude-3-haiku-20240307")
    assert haiku_3 is not None
    cost = cost_of(Usage(cache_read_input_tokens=1), haiku_3)
    assert cost.cache_read == D("3E-8")
    assert cost.to_api()["cache_read"] == "0.00000003"
    assert cost.to_api()["total"] == "0.00000003"


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (D("0"), "0"),
        (D("0E-12"), "0"),
        (D("-0"), "0"),
        (0, "0"),
        (D("3E-8"), "0.00000003"),
        (D("1E-12"), "0.000000000001"),
        (D("0.0030000"), "0.003"),
        (D("1.500"), "1.5"),
        (D("10"), "10"),
        (D("1E+3"), "1000"),
        (D("12345.678900"), "12345.6789"),
    ],
)
def test_format_usd(amount, text):
    assert format_usd(amount) == text


@pytest.mark.parametrize("amount", [D("NaN"), D("Infinity"), 0.5])
def test_format_usd_refuses_what_is_not_an_exact_amount(amount):
    with pytest.raises(ValueError):
        format_usd(amount)


def test_cost_takes_ints_from_database_rows_but_never_floats():
    cost = Cost(input=0, output=D("0.5"), cache_write=0, cache_read=0)
    assert cost.total == D("0.5") and isinstance(cost.input, Decimal)
    with pytest.raises(TypeError, match="cache_read"):
        Cost(input=D(0), output=D(0), cache_write=D(0), cache_read=0.1)  # type: ignore[arg-type]


# --- storing the prices with a job --------------------------------------------------------


@pytest.mark.parametrize("pattern", PriceTable.load(None).patterns())
def test_to_dict_from_dict_round_trip(pattern):
    prices = PriceTable.load(None).prices_for(pattern.replace("[!0-9]", "x").rstrip("*"))
    assert prices is not None and prices.pattern == pattern
    stored = prices.to_dict()
    assert all(isinstance(value, str) for value in stored.values())
    assert ModelPrices.from_dict(stored) == prices


def test_to_dict_writes_plain_decimal_strings():
    assert sonnet_4_5().to_dict() == {
        "pattern": "claude-sonnet-4-5*",
        "input": "3",
        "output": "15",
        "cache_write": "3.75",
        "cache_read": "0.3",
        "cache_write_1h": "6",
    }


def test_from_dict_fills_a_missing_one_hour_price_with_its_default():
    prices = ModelPrices.from_dict(
        {"pattern": "m", "input": "3", "output": "15", "cache_write": "3.75", "cache_read": "0.3"}
    )
    assert prices.cache_write_1h == D(6)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"pattern": "m", "input": "three", "output": "15"}, ["input", "three"]),
        ({"pattern": "m", "input": "3", "output": "-1"}, ["output", "negative"]),
        ({"pattern": "m", "input": "3", "output": "15", "extra": "1"}, ["extra"]),
        ({"pattern": "m", "input": 3.0, "output": "15"}, ["input", "number"]),
        ({"input": "3", "output": "15"}, ["pattern"]),
    ],
)
def test_from_dict_refuses_bad_data(data, words):
    with pytest.raises(PricingError) as info:
        ModelPrices.from_dict(data)
    assert all(word in str(info.value) for word in words)


def test_model_prices_validates_direct_construction():
    prices = ModelPrices(
        "m", input=3, output=15, cache_write=D("3.75"), cache_read=D("0.3"), cache_write_1h=6
    )  # type: ignore[arg-type]
    assert prices.input == D(3) and isinstance(prices.input, Decimal)
    with pytest.raises(PricingError, match="output"):
        ModelPrices("m", D(3), 15.0, D(0), D(0), D(0))  # type: ignore[arg-type]
    with pytest.raises(PricingError, match="cache_read"):
        ModelPrices("m", D(3), D(15), D(0), D("-0.1"), D(0))
    with pytest.raises(PricingError, match="pattern"):
        ModelPrices("", D(3), D(15), D(0), D(0), D(0))


# --- a pricing file overriding and extending the built-ins ---------------------------------


def test_a_file_overrides_a_builtin_and_keeps_the_rest(tmp_path):
    path = write(tmp_path, '[models."claude-sonnet-4-5*"]\ninput = 2.40\noutput = 12\n')
    prices_table = PriceTable.load(path)
    sonnet = prices_table.prices_for("claude-sonnet-4-5-20250929")
    assert sonnet is not None and (sonnet.input, sonnet.output) == (D("2.40"), D(12))
    opus = prices_table.prices_for("claude-opus-4-1-20250805")
    assert opus is not None and opus.input == D(15)
    # The override takes the built-in's place: same patterns, same order.
    assert prices_table.patterns() == PriceTable.load(None).patterns()


def test_a_file_extends_the_builtins(tmp_path):
    path = write(tmp_path, '[models."my-local-model*"]\ninput = 0\noutput = 0\n')
    prices_table = PriceTable.load(str(path))
    assert prices_table.prices_for("my-local-model-7b") is not None
    assert prices_table.prices_for("claude-haiku-4-5") is not None
    assert prices_table.patterns()[-1] == "my-local-model*"


def test_a_more_specific_file_pattern_beats_a_builtin():
    prices_table = table('[models."claude-sonnet-4-5-2025*"]\ninput = 1\noutput = 1\n')
    assert prices_table.prices_for("claude-sonnet-4-5-20250929").input == D(1)  # type: ignore[union-attr]
    assert prices_table.prices_for("claude-sonnet-4-5").input == D(3)  # type: ignore[union-attr]


def test_cache_prices_default_to_anthropics_multipliers_of_input():
    prices = table('[models."m"]\ninput = 3\noutput = 15\n').prices_for("m")
    assert prices is not None
    assert (prices.cache_write, prices.cache_read, prices.cache_write_1h) == (
        D("3.75"),
        D("0.3"),
        D("6"),
    )


def test_a_file_may_leave_out_only_some_cache_prices():
    prices = table('[models."m"]\ninput = 3\noutput = 15\ncache_read = 0.15\n').prices_for("m")
    assert prices is not None and (prices.cache_read, prices.cache_write) == (D("0.15"), D("3.75"))


def test_without_builtins_only_the_file_counts():
    prices_table = PriceTable.from_toml('[models."m"]\ninput = 1\noutput = 2\n', builtins=False)
    assert prices_table.patterns() == ["m"]
    assert prices_table.prices_for("claude-sonnet-4-5") is None


def test_an_empty_file_leaves_the_builtins():
    assert table("# nothing to change\n").patterns() == PriceTable.load(None).patterns()


def test_six_decimals_are_allowed_and_trailing_zeros_do_not_count():
    entry = "input = 0.000001\noutput = 3.000000000\ncache_write = 0.000002\n"
    prices = table(f'[models."m"]\n{entry}cache_read = 0\ncache_write_1h = 0\n').prices_for("m")
    assert prices is not None and (prices.input, prices.output) == (D("0.000001"), D(3))
    assert prices.cache_write == D("0.000002")


# --- errors: each names the file, the pattern and the field, and says what to do -----------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[models."m"]\ninputs = 3\noutput = 15\n',
            ['"m"', "unknown key 'inputs'", "input, output"],
        ),
        ('[models."m"]\noutput = 15\n', ['"m"', "'input' is missing", "input = 3.00"]),
        ('[models."m"]\ninput = 3\n', ['"m"', "'output' is missing"]),
        ('[models."m"]\ninput = -3\noutput = 15\n', ['"m"', "input = -3", "negative"]),
        ('[models."m"]\ninput = "3.00"\noutput = 15\n', ['"m"', "input", "without quotes"]),
        ('[models."m"]\ninput = 3\noutput = "lots"\n', ['"m"', "output", "must be a number"]),
        ('[models."m"]\ninput = true\noutput = 15\n', ['"m"', "input", "must be a number"]),
        ('[models."m"]\ninput = [3]\noutput = 15\n', ['"m"', "input", "must be a number"]),
        ('[models."m"]\ninput = nan\noutput = 15\n', ['"m"', "input", "not a finite number"]),
        ('[models."m"]\ninput = 3\noutput = inf\n', ['"m"', "output", "not a finite number"]),
        (
            '[models."m"]\ninput = 3\noutput = 15\ncache_read = 0.0000001\n',
            ['"m"', "cache_read", "more than 6 decimal places", "picodollar", "round it"],
        ),
        (
            '[models."m"]\ninput = 0.000001\noutput = 1\n',
            ['"m"', "cache_write defaults to 1.25 x input", "set cache_write explicitly"],
        ),
        ('[models."m"]\ninput = 20000\noutput = 1\n', ['"m"', "input", "check the unit"]),
        ('[models."m"]\ncache_write_1h = 1\n', ['"m"', "'input' is missing"]),
        ('[model."m"]\ninput = 3\noutput = 15\n', ["unknown top-level key 'model'", "[models."]),
        ("models = 3\n", ["'models' must be a table"]),
        ('[models]\n"m" = 3\n', ['"m"', "must be a table of prices"]),
        ('[models.""]\ninput = 3\noutput = 15\n', ["pattern is empty", "claude-sonnet-4-5*"]),
        ("[models.claude-x-4.5]\ninput = 3\noutput = 15\n", ["unknown key '5'", "quote a pattern"]),
        ('[models."m"\ninput = 3\n', ["not valid TOML", "fix the syntax"]),
        ('[models."m"]\ninput = 3\ninput = 4\noutput = 1\n', ["not valid TOML"]),
    ],
)
def test_a_bad_file_is_refused_with_a_message_that_says_where_and_what(text, words):
    with pytest.raises(PricingError) as info:
        table(text)
    message = str(info.value)
    assert message.startswith("prices.toml: ")
    assert all(word in message for word in words), message


def test_the_same_errors_come_from_a_file_and_name_it(tmp_path):
    path = write(tmp_path, '[models."claude-opus-4*"]\ninput = 15\noutput = -75\n')
    with pytest.raises(PricingError) as info:
        PriceTable.load(path)
    assert str(path) in str(info.value) and "claude-opus-4*" in str(info.value)
    assert "output = -75" in str(info.value)


def test_a_missing_file_is_an_error_that_names_it(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PricingError) as info:
        PriceTable.load(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value) and "PROMPTQ_PRICING_FILE" in str(info.value)


def test_a_directory_is_not_a_pricing_file(tmp_path):
    with pytest.raises(PricingError, match="cannot read pricing file"):
        PriceTable.load(tmp_path)


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = write(tmp_path, b'[models."m"]\ninput = 3\noutput = 15 # \xff\n')
    with pytest.raises(PricingError, match="not UTF-8"):
        PriceTable.load(path)


def test_pricing_error_is_a_value_error():
    assert issubclass(PricingError, ValueError)
