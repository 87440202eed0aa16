"""deploy/grafana/promptq.json and deploy/prometheus/alerts.yml: every metric they use is
one promptq's /metrics serves, the alert rules parse and their tests pass (with promtool
when it is installed; .ci/run installs it), and the dashboard's queries are PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import auth, wait_for_status

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "promptq.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not on PATH (.ci/run installs it)"
)
METRIC = re.compile(r"\bpromptq_[a-z0-9_]+\b")
# Grafana's variables, as a query would have them filled in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "6h", "$model": ".*"}


def rule_list() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[str]:
    queries = []
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            queries.append(expr)
    return queries


def test_every_metric_the_dashboard_and_the_rules_use_is_served(
    client: Any, worker_process: Any, api_key: str
) -> None:
    # One job through the worker, so that every family has samples (the limiter's too).
    job = client.post("/v1/jobs", json={"prompt": "for the dashboards"}, headers=auth(api_key))
    wait_for_status(client, api_key, job.json()["id"], {"succeeded"})
    exposition = client.get("/metrics").text
    served = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()}
    used = {
        name
        for text in [*(rule["expr"] for rule in rule_list()), *dashboard_queries()]
        for name in METRIC.findall(text)
    }
    assert len(used) >= 12
    assert sorted(used - served) == []


def test_the_rules_are_alerts_with_a_severity_and_a_summary() -> None:
    rules = rule_list()
    names = {rule["alert"] for rule in rules}
    assert {
        "PromptqBacklogGrowing",
        "PromptqUpstreamErrors",
        "PromptqWebhookFailures",
        "PromptqSpendNearBudget",
        "PromptqNoWorker",
    } <= names
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert _balanced(rule["expr"]), rule["alert"]
    tested = {
        test["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for test in case["alert_rule_test"]
    }
    assert tested == names


def test_the_dashboard_is_a_grafana_dashboard_over_a_chosen_prometheus() -> None:
    board = dashboard()
    assert board["uid"] == "promptq" and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(panel["title"] for panel in board["panels"]).lower()
    for subject in ("status", "throughput", "latency", "429", "queue", "spend", "webhook"):
        assert subject in titles
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
    assert all(_balanced(query) for query in dashboard_queries())


@needs_promtool
def test_promtool_checks_the_rules_and_runs_their_tests() -> None:
    assert PROMTOOL is not None
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        result = subprocess.run(
            [PROMTOOL, *command], capture_output=True, text=True, timeout=60, cwd=RULES.parent
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    # promtool parses expressions in rule files: each query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{n}", "expr": query}
                    for n, query in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _balanced(expr: str) -> bool:
    """Brackets that close in order, outside quoted label values."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack and bool(expr.strip())
