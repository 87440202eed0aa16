"""Templates rendered in this process (promptq.template_sandbox.render_here, as `promptq
run` renders them): the same sandbox and output limits as the API's child processes, whose
time limit and process boundary tests/stack/test_templates.py tests through the API."""

from __future__ import annotations

import pytest

from promptq.config import Settings
from promptq.models import PromptTemplate
from promptq.template_sandbox import Limits, TemplateError, check_here, render_here
from promptq.templates import job_from_here

LIMITS = Limits(max_ms=1000, max_bytes=10_000)
HINT = "give the row that column"


def render(prompt: str, **variables: object) -> str:
    return render_here({"prompt": prompt}, dict(variables), LIMITS, HINT)["prompt"]


def refusal(prompt: str, **variables: object) -> str:
    with pytest.raises(TemplateError) as refused:
        render(prompt, **variables)
    return str(refused.value)


def test_variables_loops_and_filters_render() -> None:
    text = render(
        "{{ who|title }}: {% for item in items %}{{ loop.index }}.{{ item }} {% endfor %}",
        who="ada lovelace",
        items=["notes", "engine"],
    )
    assert text == "Ada Lovelace: 1.notes 2.engine "


def test_each_field_renders_with_the_same_variables() -> None:
    rendered = render_here(
        {"prompt": "Review {{ pr }}", "system": "You review {{ repo }}."},
        {"pr": 42, "repo": "promptq"},
        LIMITS,
        HINT,
    )
    assert rendered == {"prompt": "Review 42", "system": "You review promptq."}


def test_a_missing_variable_names_itself_its_field_and_the_hint() -> None:
    assert refusal("Hello {{ name }}") == f"prompt: 'name' is undefined; {HINT}"


def test_a_syntax_error_names_its_field_and_line() -> None:
    with pytest.raises(TemplateError) as refused:
        check_here({"system": "fine\n{{ oops"}, LIMITS)
    assert str(refused.value).startswith("system: line 2:")


@pytest.mark.parametrize(
    "prompt",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ input.__class__.__init__.__globals__ }}",
    ],
)
def test_python_internals_are_out_of_reach(prompt: str) -> None:
    message = refusal(prompt, input={"x": 1})
    assert "refused" in message and "unsafe" in message
    assert "<module" not in message


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ("{{ 'x' * 20000 }}", "'*' would make a value of 20000"),
        ("{{ [0] * 10 ** 9 }}", "'*' would make a value of 1000000000"),
        ("{{ 9 ** (9 ** 9) }}", "'**' would make an integer of more than"),
        ("{{ 'y' * 9999 + 'z' * 9999 }}", "'+' would make a value of 19998"),
        ("{{ '%20000s' % 'x' }}", "'%' would make a string of"),
        ("{{ '%*d' % (5, 1) }}", "'*' width or precision is not allowed"),
        ("{% for i in range(50000) %}abc{% endfor %}", "renders to more than 10000 bytes"),
        ("{% for i in range(10 ** 6) %}{% endfor %}", "Range too big"),
        ("{{ 'x'|center(20000) }}", "renders to more than 10000 bytes"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_what_would_outgrow_the_limits_is_refused_before_it_is_made(prompt: str, says: str) -> None:
    message = refusal(prompt)
    assert message.startswith("prompt: ") and says in message, message


def test_a_stored_templates_settings_win_over_what_it_renders(settings: Settings) -> None:
    template = PromptTemplate(
        name="triage",
        prompt="Triage issue {{ number }}: {{ input.title }}",
        system="You triage {{ input.repo }}.",
        model="claude-haiku-4-5",
        max_tokens=300,
    )
    payload = {"number": 7, "title": "Crash on start", "repo": "promptq"}

    job = job_from_here(settings, template, payload, HINT)

    assert job.prompt == "Triage issue 7: Crash on start"
    assert job.system == "You triage promptq."
    assert (job.model, job.max_tokens, job.temperature) == ("claude-haiku-4-5", 300, None)


def test_a_stored_templates_error_names_the_template(settings: Settings) -> None:
    template = PromptTemplate(name="triage", prompt="{{ missing }}")
    with pytest.raises(TemplateError, match=r"^template 'triage': prompt: 'missing' is undef"):
        job_from_here(settings, template, {}, HINT)
