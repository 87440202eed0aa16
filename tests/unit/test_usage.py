import dataclasses

import pytest

from promptq.usage import Usage


def test_reads_the_usage_of_an_anthropic_message():
    message = {
        "id": "msg_01",
        "type": "message",
        "usage": {
            "input_tokens": 1200,
            "output_tokens": 345,
            "cache_creation_input_tokens": 2000,
            "cache_read_input_tokens": 10_000,
            "service_tier": "standard",
        },
    }
    assert Usage.from_message(message) == Usage(
        input_tokens=1200,
        output_tokens=345,
        cache_creation_input_tokens=2000,
        cache_read_input_tokens=10_000,
    )


def test_cache_writes_without_a_breakdown_are_all_five_minute_writes():
    usage = Usage.from_message({"usage": {"cache_creation_input_tokens": 500}})
    assert usage.cache_creation_1h_input_tokens == 0
    assert usage.cache_creation_5m_input_tokens == 500


def test_reads_the_one_hour_part_of_cache_writes_from_the_breakdown():
    message = {
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 400,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 300},
        }
    }
    usage = Usage.from_message(message)
    assert usage.cache_creation_input_tokens == 400
    assert usage.cache_creation_1h_input_tokens == 300
    assert usage.cache_creation_5m_input_tokens == 100


def test_a_breakdown_without_a_total_gives_the_total():
    message = {
        "usage": {
            "cache_creation": {"ephemeral_5m_input_tokens": 70, "ephemeral_1h_input_tokens": 30},
        }
    }
    usage = Usage.from_message(message)
    assert (usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (100, 30)


def test_a_total_smaller_than_its_breakdown_is_raised_to_the_breakdown():
    message = {
        "usage": {
            "cache_creation_input_tokens": 10,
            "cache_creation": {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 50},
        }
    }
    usage = Usage.from_message(message)
    assert (usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (55, 50)


@pytest.mark.parametrize(
    "message",
    [{}, {"usage": None}, {"usage": "12 tokens"}, {"usage": [1, 2]}, {"type": "error"}],
)
def test_a_message_without_a_usage_object_has_zero_usage(message):
    assert Usage.from_message(message) == Usage()


@pytest.mark.parametrize("junk", [None, "12", 12.0, 1.5, True, -5, [3], {"n": 3}])
def test_a_count_that_is_not_a_non_negative_int_is_taken_as_zero(junk):
    usage = Usage.from_message(
        {"usage": {"input_tokens": junk, "output_tokens": 7, "cache_read_input_tokens": junk}}
    )
    assert usage == Usage(output_tokens=7)


@pytest.mark.parametrize(
    "breakdown",
    [None, "1h", {"ephemeral_1h_input_tokens": "300"}, {"ephemeral_1h_input_tokens": -3}],
)
def test_a_junk_breakdown_is_ignored(breakdown):
    message = {"usage": {"cache_creation_input_tokens": 40, "cache_creation": breakdown}}
    usage = Usage.from_message(message)
    assert (usage.cache_creation_input_tokens, usage.cache_creation_1h_input_tokens) == (40, 0)


def test_to_api_gives_exactly_the_four_anthropic_fields():
    usage = Usage(
        input_tokens=1,
        output_tokens=2,
        cache_creation_input_tokens=30,
        cache_read_input_tokens=4,
        cache_creation_1h_input_tokens=10,
    )
    assert usage.to_api() == {
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 4,
    }


def test_to_api_round_trips_through_from_message():
    usage = Usage(input_tokens=5, output_tokens=6, cache_creation_input_tokens=7)
    assert Usage.from_message({"usage": usage.to_api()}) == usage


def test_the_constructor_refuses_counts_that_make_no_sense():
    with pytest.raises(ValueError, match="input_tokens"):
        Usage(input_tokens=-1)
    with pytest.raises(ValueError, match="cannot exceed"):
        Usage(cache_creation_input_tokens=10, cache_creation_1h_input_tokens=11)
    with pytest.raises(TypeError, match="output_tokens"):
        Usage(output_tokens=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input_tokens"):
        Usage(input_tokens=True)


def test_usage_is_immutable():
    usage = Usage(input_tokens=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        usage.input_tokens = 2  # type: ignore[misc]
