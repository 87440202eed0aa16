"""The integration guides in docs/ hold when followed literally: the n8n workflow is wired
as the guide says and its request body is a job promptq accepts; the two webhook receivers
accept what promptq signs and refuse what it did not; the Zapier guide's requests, taken
from the guide's own text, make the jobs it describes and reach a receiver."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import auth, wait_for_status
from standardwebhooks.webhooks import Webhook

from promptq.jobspec.schemas import JobCreate

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLES = DOCS / "examples"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")

RESUME_URL = "https://n8n.example.com/webhook-waiting/1234"


# ---------------------------------------------------------------------------------------
# n8n


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    return dict(json.loads((DOCS / "n8n-workflow.json").read_text()))


def node_named(workflow: dict[str, Any], node_type: str) -> dict[str, Any]:
    [found] = [n for n in workflow["nodes"] if n["type"] == node_type]
    return dict(found)


def next_nodes(workflow: dict[str, Any], name: str, output: int = 0) -> list[str]:
    outputs = workflow["connections"].get(name, {}).get("main", [])
    return [c["node"] for c in outputs[output]] if len(outputs) > output else []


def test_the_n8n_workflow_is_wired_trigger_http_wait_if(workflow: dict[str, Any]) -> None:
    names = [n["name"] for n in workflow["nodes"]]
    assert len(names) == len(set(names))
    assert len({n["id"] for n in workflow["nodes"]}) == len(names)
    for source, outputs in workflow["connections"].items():
        assert source in names
        assert all(c["node"] in names for output in outputs["main"] for c in output)

    trigger = node_named(workflow, "n8n-nodes-base.manualTrigger")
    http = node_named(workflow, "n8n-nodes-base.httpRequest")
    wait = node_named(workflow, "n8n-nodes-base.wait")
    branch = node_named(workflow, "n8n-nodes-base.if")
    result = node_named(workflow, "n8n-nodes-base.set")
    failed = node_named(workflow, "n8n-nodes-base.stopAndError")
    assert next_nodes(workflow, trigger["name"]) == [http["name"]]
    assert next_nodes(workflow, http["name"]) == [wait["name"]]
    assert next_nodes(workflow, wait["name"]) == [branch["name"]]
    assert next_nodes(workflow, branch["name"], 0) == [result["name"]]  # true
    assert next_nodes(workflow, branch["name"], 1) == [failed["name"]]  # false


def test_the_n8n_http_request_posts_a_job_with_the_resume_url(
    workflow: dict[str, Any],
) -> None:
    http = node_named(workflow, "n8n-nodes-base.httpRequest")
    assert 4 <= http["typeVersion"] < 5
    params = http["parameters"]
    assert params["method"] == "POST" and params["url"].endswith("/v1/jobs")
    assert params["authentication"] == "genericCredentialType"
    assert params["genericAuthType"] == "httpHeaderAuth"
    assert set(http["credentials"]) == {"httpHeaderAuth"}
    assert params["sendBody"] is True and params["specifyBody"] == "json"

    # An n8n expression: "=" then text with {{ }} parts, which n8n fills in before sending.
    assert params["jsonBody"].startswith("=")
    template = params["jsonBody"][1:]
    assert '"callback_url": "{{ $execution.resumeUrl }}"' in template
    filled = template.replace("{{ $execution.resumeUrl }}", RESUME_URL).replace(
        "{{ $execution.id }}", "1234"
    )
    assert "{{" not in filled
    body = json.loads(filled)
    assert body["callback_url"] == RESUME_URL and body["prompt"]
    job = JobCreate.model_validate(body)  # what POST /v1/jobs accepts
    assert job.target_url == RESUME_URL
    # The guide shows the same body.
    assert template in (DOCS / "n8n.md").read_text()


def test_the_n8n_wait_node_resumes_on_a_post_and_the_branches_read_the_event(
    workflow: dict[str, Any],
) -> None:
    wait = node_named(workflow, "n8n-nodes-base.wait")
    assert wait["parameters"]["resume"] == "webhook"
    assert wait["parameters"]["httpMethod"] == "POST"  # the node's default is GET
    assert wait["webhookId"]

    # The Wait node's output is the request ({headers, params, query, body}); promptq's body
    # is {"type", "timestamp", "data": the job}.
    [condition] = node_named(workflow, "n8n-nodes-base.if")["parameters"]["conditions"][
        "conditions"
    ]
    assert condition["leftValue"] == "={{ $json.body.type }}"
    assert condition["rightValue"] == "job.succeeded"
    assert condition["operator"] == {"type": "string", "operation": "equals"}

    fields = {
        a["name"]: a["value"]
        for a in node_named(workflow, "n8n-nodes-base.set")["parameters"]["assignments"][
            "assignments"
        ]
    }
    assert fields["output_text"] == "={{ $json.body.data.output_text }}"
    message = node_named(workflow, "n8n-nodes-base.stopAndError")["parameters"]["errorMessage"]
    assert "$json.body.data.error.message" in message


# ---------------------------------------------------------------------------------------
# n8n's AI nodes: a Basic LLM Chain on an Anthropic Chat Model whose credential is promptq

AI_CREDENTIAL = "promptq (Anthropic API)"
# What the Anthropic Chat Model 1.3 of n8n 2.8.4 sent promptq for this workflow, recorded
# from a real run (LangChain's ChatAnthropic under the node).
N8N_ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def ai_workflow() -> dict[str, Any]:
    return dict(json.loads((DOCS / "n8n-ai-workflow.json").read_text()))


def test_the_ai_workflow_is_trigger_chain_and_an_anthropic_model_on_promptq(
    ai_workflow: dict[str, Any],
) -> None:
    names = [n["name"] for n in ai_workflow["nodes"]]
    assert len(names) == len(set(names)) == len({n["id"] for n in ai_workflow["nodes"]})
    trigger = node_named(ai_workflow, "n8n-nodes-base.manualTrigger")
    chain = node_named(ai_workflow, "@n8n/n8n-nodes-langchain.chainLlm")
    model = node_named(ai_workflow, "@n8n/n8n-nodes-langchain.lmChatAnthropic")
    assert next_nodes(ai_workflow, trigger["name"]) == [chain["name"]]
    [link] = ai_workflow["connections"][model["name"]]["ai_languageModel"][0]
    assert link == {"node": chain["name"], "type": "ai_languageModel", "index": 0}

    assert chain["parameters"]["promptType"] == "define" and chain["parameters"]["text"]
    assert model["typeVersion"] == 1.3  # the model is a resource locator: list or id
    assert model["parameters"]["model"]["__rl"] is True
    assert model["credentials"]["anthropicApi"]["name"] == AI_CREDENTIAL
    guide = (DOCS / "n8n.md").read_text()
    assert f"Name it `{AI_CREDENTIAL}`" in guide and "n8n-ai-workflow.json" in guide


def test_the_ai_workflows_model_is_listed_priced_and_answered_by_promptq(
    ai_workflow: dict[str, Any], client: Any, worker_process: Any, api_key: str
) -> None:
    from promptq.pricing import PriceTable

    model = node_named(ai_workflow, "@n8n/n8n-nodes-langchain.lmChatAnthropic")
    model_id = model["parameters"]["model"]["value"]
    assert PriceTable.load(None).prices_for(model_id) is not None

    # The model picker: GET {Base URL}/v1/models with the credential's x-api-key, no paging;
    # it shows display_name and sorts by created_at.
    listed = client.get("/v1/models", headers={"x-api-key": api_key, **N8N_ANTHROPIC_HEADERS})
    assert listed.status_code == 200
    models = listed.json()["data"]
    assert model_id in {m["id"] for m in models}
    for entry in models:
        assert entry["display_name"] and datetime.fromisoformat(entry["created_at"])

    # The chain's call, as the node sent it.
    chain = node_named(ai_workflow, "@n8n/n8n-nodes-langchain.chainLlm")
    body = {
        "model": model_id,
        "max_tokens": model["parameters"]["options"]["maxTokensToSample"],
        "messages": [{"role": "user", "content": chain["parameters"]["text"]}],
        "thinking": {"type": "disabled"},
    }
    answer = client.post(
        "/v1/messages", json=body, headers={"x-api-key": api_key, **N8N_ANTHROPIC_HEADERS}
    )
    assert answer.status_code == 200, answer.text
    assert chain["parameters"]["text"] in answer.json()["content"][0]["text"]


# ---------------------------------------------------------------------------------------
# The webhook receivers


SECRET = "whsec_" + base64.b64encode(b"promptq docs test secret bytes!!").decode()
EVENT = {
    "type": "job.succeeded",
    "timestamp": "2026-01-01T00:00:00Z",
    "data": {"id": "job_01TEST", "status": "succeeded", "output_text": 'héllo "world"'},
}


def signed(
    body: bytes, secret: str = SECRET, at: datetime | None = None, msg_id: str = "msg_01TEST"
) -> dict[str, str]:
    """The three headers, as promptq's sender makes them (it signs with the same library)."""
    at = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body.decode()),
    }


def cases() -> list[tuple[str, dict[str, str], bytes, bool]]:
    """(name, headers, body, should be accepted): what every receiver must get right."""
    body = json.dumps(EVENT, separators=(",", ":"), ensure_ascii=False).encode()
    good = signed(body)
    other = "whsec_" + base64.b64encode(b"another secret, not the key's").decode()
    stale = datetime.now(UTC) - timedelta(minutes=6)
    future = datetime.now(UTC) + timedelta(minutes=6)
    wrong = signed(body, other)["webhook-signature"]
    return [
        ("valid", good, body, True),
        ("upper-case header names", {k.title(): v for k, v in good.items()}, body, True),
        (
            "one of several signatures",
            {**good, "webhook-signature": f"v1,{'A' * 44} {wrong} {good['webhook-signature']}"},
            body,
            True,
        ),
        ("tampered body", good, body.replace(b"world", b"WORLD"), False),
        ("wrong secret", signed(body, other), body, False),
        ("stale timestamp", signed(body, at=stale), body, False),
        ("future timestamp", signed(body, at=future), body, False),
        ("another id", {**good, "webhook-id": "msg_02OTHER"}, body, False),
        ("no signature", {k: v for k, v in good.items() if k != "webhook-signature"}, body, False),
        ("unversioned signature", {**good, "webhook-signature": "K5oZfzN95Z9U"}, body, False),
        (
            "another version",
            {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v2,")},
            body,
            False,
        ),
    ]


@pytest.fixture(scope="module")
def verify_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verify_webhook", EXAMPLES / "verify_webhook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Signed when the test runs, not when it is collected: the timestamps must be fresh.
CASE_NAMES = [case[0] for case in cases()]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_the_python_receiver(verify_py: ModuleType, name: str) -> None:
    [(headers, body, accepted)] = [(h, b, a) for n, h, b, a in cases() if n == name]
    if accepted:
        assert verify_py.verify(SECRET, headers, body) == EVENT
    else:
        with pytest.raises(verify_py.InvalidWebhook):
            verify_py.verify(SECRET, headers, body)


JS_DRIVER = """
const { verify, WebhookVerificationError } = require(process.argv[1]);
const input = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
const results = input.cases.map(([name, headers, body]) => {
  try {
    return { name, event: verify(input.secret, headers, Buffer.from(body, "base64")) };
  } catch (error) {
    if (!(error instanceof WebhookVerificationError)) throw error;
    return { name, error: error.message };
  }
});
console.log(JSON.stringify(results));
"""


@needs_node
def test_the_node_receiver() -> None:
    all_cases = cases()
    payload = {
        "secret": SECRET,
        "cases": [[n, h, base64.b64encode(b).decode()] for n, h, b, _ in all_cases],
    }
    done = subprocess.run(
        [str(NODE), "-e", JS_DRIVER, str(EXAMPLES / "verify_webhook.js")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    results = {r["name"]: r for r in json.loads(done.stdout)}
    for name, _, _, accepted in all_cases:
        if accepted:
            assert results[name].get("event") == EVENT, (name, results[name])
        else:
            assert "error" in results[name], (name, results[name])


@needs_node
def test_the_zapier_platform_app_code_parses(tmp_path: Path) -> None:
    [code] = re.findall(r"```js\n(.*?)```", (DOCS / "zapier.md").read_text(), re.DOTALL)
    # Its polling reads the most recently finished first, as the no-code trigger does.
    assert 'order: "finished"' in code
    (tmp_path / "index.js").write_text(code)
    subprocess.run([str(NODE), "--check", str(tmp_path / "index.js")], check=True, timeout=30)


# ---------------------------------------------------------------------------------------
# The guides' requests against a real promptq, with the receivers running as documented


class Receiver:
    """One of docs/examples/ run as its own process, as the guide runs it."""

    def __init__(self, command: list[str], secret: str) -> None:
        from promptq.supervisor import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/promptq"
        self.process = subprocess.Popen(
            command,
            env={**os.environ, "PROMPTQ_WEBHOOK_SECRET": secret, "PORT": str(self.port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.wait_for("listening on")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if text in line:
                return line
            seen.append(line)
        raise AssertionError(f"the receiver never printed {text!r}; it printed {seen}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def signed_key(database_url: str, test_env: dict[str, str]) -> tuple[str, str]:
    from promptq.db import session_scope
    from promptq.keys.service import create_key

    with session_scope(database_url) as session:
        created = create_key(session, "docs")
        return created.key, created.webhook_secret


@pytest.fixture
def python_receiver(signed_key: tuple[str, str]) -> Iterator[Receiver]:
    receiver = Receiver([sys.executable, str(EXAMPLES / "verify_webhook.py")], signed_key[1])
    yield receiver
    receiver.stop()


@pytest.fixture
def node_receiver(signed_key: tuple[str, str]) -> Iterator[Receiver]:
    if NODE is None:
        pytest.skip("`node` is not on PATH")
    receiver = Receiver([NODE, str(EXAMPLES / "verify_webhook.js")], signed_key[1])
    yield receiver
    receiver.stop()


def shell_blocks(guide: str) -> list[list[str]]:
    """The guide's ```sh blocks, each split into words as a shell would (comments dropped)."""
    text = (DOCS / guide).read_text()
    return [
        shlex.split(block.replace("\\\n", " "), comments=True)
        for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)
    ]


def zapier_form_fields() -> dict[str, str]:
    """The `--data-urlencode` fields of the Zapier guide's first POST /v1/jobs example."""
    for words in shell_blocks("zapier.md"):
        if "--data-urlencode" in words and "$PROMPTQ_API_URL/v1/jobs" in words:
            pairs = [words[i + 1] for i, w in enumerate(words) if w == "--data-urlencode"]
            return dict(pair.split("=", 1) for pair in pairs)
    raise AssertionError("no form example in docs/zapier.md")


def zapier_json_body() -> dict[str, Any]:
    for words in shell_blocks("zapier.md"):
        if "-d" in words and "$PROMPTQ_API_URL/v1/jobs" in words:
            return dict(json.loads(words[words.index("-d") + 1]))
    raise AssertionError("no JSON example in docs/zapier.md")


def test_the_zapier_form_example_makes_the_job_and_reaches_the_python_receiver(
    client: Any,
    worker_process: Any,
    signed_key: tuple[str, str],
    python_receiver: Receiver,
) -> None:
    key, _ = signed_key
    fields = zapier_form_fields()
    assert set(fields) >= {"prompt", "model", "max_tokens", "system", "temperature", "metadata"}
    # The guide's optional webhook_url row, pointed at the receiver of the receivers guide.
    response = client.post(
        "/v1/jobs", data={**fields, "webhook_url": python_receiver.url}, headers=auth(key)
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["request"]["max_tokens"] == int(fields["max_tokens"])
    assert job["request"]["temperature"] == float(fields["temperature"])
    assert job["request"]["system"] == fields["system"]
    assert job["model"] == fields["model"]
    assert job["metadata"] == json.loads(fields["metadata"])

    line = python_receiver.wait_for(job["id"])
    assert "job.succeeded" in line
    webhook_id = line.split(":", 1)[0]
    assert webhook_id.startswith("msg_")
    # A redelivery keeps the webhook-id, and the receiver skips what it has handled.
    assert client.post(f"/v1/jobs/{job['id']}/redeliver", headers=auth(key)).status_code == 202
    assert python_receiver.wait_for(webhook_id) == f"{webhook_id}: already handled, skipped"


def test_the_zapier_json_example_takes_numbers_as_text_and_nested_metadata(
    client: Any, api_key: str
) -> None:
    body = zapier_json_body()
    assert isinstance(body["max_tokens"], str)  # as Zapier may send it
    response = client.post("/v1/jobs", json=body, headers=auth(api_key))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["max_tokens"] == int(body["max_tokens"])
    assert job["metadata"] == body["metadata"]


def test_the_zapier_guide_notes_hold(client: Any, api_key: str, settings: Any) -> None:
    guide = (DOCS / "zapier.md").read_text()
    assert f"default `{settings.default_model}`" in guide
    assert f"default {settings.default_max_tokens}" in guide
    # An empty row is refused, naming the field; so is a misspelt one.
    empty = client.post(
        "/v1/jobs", data={"prompt": "x", "max_tokens": ""}, headers=auth(api_key)
    ).json()
    assert empty["error"]["message"].startswith("max_tokens: Input should be a valid integer")
    typo = client.post("/v1/jobs", data={"promt": "x"}, headers=auth(api_key)).json()
    assert "promt: Extra inputs are not permitted" in typo["error"]["message"]
    # The one exception the guide names: an empty `system` means no system prompt.
    assert "an empty `system` row means no system prompt" in guide
    no_system = client.post("/v1/jobs", data={"prompt": "x", "system": ""}, headers=auth(api_key))
    assert no_system.status_code == 202 and "system" not in no_system.json()["request"]
    # JSON text as metadata works in a form, not in a JSON body.
    as_json = client.post(
        "/v1/jobs", json={"prompt": "x", "metadata": '{"row": 17}'}, headers=auth(api_key)
    )
    assert as_json.status_code == 422
    # The same Idempotency-Key and body return the first job.
    first, again = (
        client.post(
            "/v1/jobs",
            data={"prompt": "Hello once"},
            headers={**auth(api_key), "Idempotency-Key": "zap-record-1234"},
        ).json()
        for _ in range(2)
    )
    assert first["id"] == again["id"]


def test_a_rest_hook_subscription_reaches_the_node_receiver(
    client: Any,
    worker_process: Any,
    signed_key: tuple[str, str],
    node_receiver: Receiver,
) -> None:
    key, _ = signed_key
    created = client.post(
        "/v1/webhooks",
        json={"url": node_receiver.url, "events": ["job.succeeded"]},
        headers=auth(key),
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    assert hook["id"].startswith("whk_") and hook["disabled_at"] is None

    job = client.post("/v1/jobs", data={"prompt": "For the REST hook"}, headers=auth(key)).json()
    assert "job.succeeded" in node_receiver.wait_for(job["id"])
    # The polling trigger's request, as the guide writes it, lists it first.
    assert wait_for_status(client, key, job["id"], {"succeeded"})
    [poll] = {
        word.removeprefix("$PROMPTQ_API_URL")
        for words in shell_blocks("zapier.md")
        for word in words
        if word.startswith("$PROMPTQ_API_URL/v1/jobs?status=succeeded")
    }
    assert "order=finished" in poll
    listed = client.get(poll, headers=auth(key)).json()
    assert listed["data"][0]["id"] == job["id"]
    assert all(j["status"] == "succeeded" for j in listed["data"])

    deleted = client.delete(f"/v1/webhooks/{hook['id']}", headers=auth(key))
    assert deleted.json() == {"id": hook["id"], "object": "webhook", "deleted": True}
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=auth(key)).status_code == 404
