"""deploy/: what can be checked without a container engine, a cluster or systemd.

Every file parses; every `PROMPTQ_*` variable named there is a real setting and every
setting is in .env.example with its default; every `promptq ...` invocation (the image's
entry point and command, Compose commands, Kubernetes args, systemd ExecStart lines) is
parsed by the real click command tree, flags and values included; the services, their
order and the references between manifests hold together.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from helpers import REPO
from pydantic import AliasChoices, SecretStr

from promptq.cli.main import cli
from promptq.config import Settings

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
ENV_EXAMPLE = DEPLOY / ".env.example"

PROMPTQ_SERVICES = {"migrate", "api", "worker", "beat", "flower"}
SYSTEMD_UNITS = {
    "promptq-api.service",
    "promptq-worker@.service",
    "promptq-beat.service",
    "promptq-flower.service",
    "promptq-migrate.service",
}


# ---------------------------------------------------------------------------- the CLI


def parse_cli(argv: Sequence[str]) -> click.Context:
    """`promptq ARGV` parsed by the real command tree down to its leaf, without running it.

    Raises click's UsageError for an unknown command or flag, or a value of the wrong type.
    The deploy files pass no option of the root group itself, so a leading flag is refused.
    """
    args = list(argv)
    command: click.Command = cli
    parent = click.Context(cli, info_name="promptq")
    name = "promptq"
    while isinstance(command, click.Group):
        if not args or args[0].startswith("-"):
            raise click.UsageError(f"no subcommand in promptq {shlex.join(argv)}")
        name, *args = args
        sub = command.get_command(parent, name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r} in promptq {shlex.join(argv)}")
        if isinstance(sub, click.Group):
            parent = click.Context(sub, info_name=name, parent=parent)
        command = sub
    return command.make_context(name, args, parent=parent)


def leaf(ctx: click.Context) -> str:
    """The command path below `promptq`, e.g. "db upgrade"."""
    return ctx.command_path.removeprefix("promptq ")


def test_parse_cli_refuses_what_the_cli_refuses() -> None:
    """The checks below are only as good as this parser: it must say no."""
    assert leaf(parse_cli(["db", "upgrade"])) == "db upgrade"
    assert parse_cli(["api", "--port", "9000"]).params["port"] == 9000
    for argv in (["nosuch"], ["api", "--nosuch"], ["api", "--port", "eighty"], ["db"], []):
        with pytest.raises(click.UsageError):
            parse_cli(argv)


def test_the_console_script_is_promptq() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["promptq"] == "promptq.cli:main"


# ---------------------------------------------------------------------------- settings


def setting_env_names() -> dict[str, list[str]]:
    """Each Settings field and the environment variables it is read from, first the main one."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: dict[str, list[str]] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias or field.alias
        if isinstance(alias, AliasChoices):
            envs = [choice for choice in alias.choices if isinstance(choice, str)]
        elif isinstance(alias, str):
            envs = [alias]
        else:
            envs = [f"{prefix}{name}"]
        names[name] = [env.upper() for env in envs]
    return names


def is_secret(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def deploy_files() -> Iterator[Path]:
    """Every file under deploy/ but a local deploy/.env (a user's copy with their secrets)."""
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != ".env":
            yield path


def test_every_promptq_variable_in_deploy_is_a_setting() -> None:
    allowed = {env for envs in setting_env_names().values() for env in envs}
    unknown = {
        f"deploy/{path.relative_to(DEPLOY)}: {variable}"
        for path in deploy_files()
        for variable in re.findall(r"\bPROMPTQ_[A-Z0-9_]*[A-Z0-9]", path.read_text())
        if variable not in allowed
    }
    assert not unknown, sorted(unknown)


def env_example() -> list[tuple[str, str, bool]]:
    """(name, value, commented out) for each assignment line of .env.example."""
    entries = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            entries.append((match[2], match[3], match[1] is not None))
    return entries


def test_env_example_lists_every_setting_once() -> None:
    listed = [name for name, _, _ in env_example()]
    for field, envs in setting_env_names().items():
        assert listed.count(envs[0]) == 1, f"{envs[0]} ({field}) is not in .env.example once"


def test_env_example_values_are_the_defaults() -> None:
    by_env = {envs[0]: field for field, envs in setting_env_names().items()}
    for name, value, commented in env_example():
        if name not in by_env:
            continue  # e.g. POSTGRES_PASSWORD, read by compose.yml alone
        field = Settings.model_fields[by_env[name]]
        default = field.get_default()
        if is_secret(by_env[name]):
            assert value == "", f"{name}: a secret is left empty in .env.example"
        if default is None:
            # Even an empty value is not "unset" (an empty path is ".", an empty key hides
            # COMETAPI_KEY): an unset-by-default setting stays commented out.
            assert commented, f"{name} is unset by default: comment it out"
        else:
            assert not commented, f"{name}: show the default {default!r} as a setting"
            # Validated as Settings validates it, field validators included.
            parsed = Settings.model_construct()
            Settings.__pydantic_validator__.validate_assignment(parsed, by_env[name], value)
            assert getattr(parsed, by_env[name]) == default, f"{name}={value}, not {default!r}"


def test_env_example_has_no_comment_after_a_value() -> None:
    """Docker's env_file and systemd's EnvironmentFile keep such a comment in the value."""
    for name, value, _ in env_example():
        assert not re.search(r"\s", value), f"{name}={value}: whitespace or a trailing comment"


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        pending = ""
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The build stages, each from its FROM; the global ARGs before the first are left out."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in dockerfile():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for kw, rest in stage if kw == keyword]
    assert len(values) == 1, f"{keyword}: {values}"
    return values[0]


def dockerfile_entrypoint() -> list[str]:
    return json.loads(only(dockerfile_stages()[-1], "ENTRYPOINT"))


def dockerfile_cmd() -> list[str]:
    return json.loads(only(dockerfile_stages()[-1], "CMD"))


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    args = dict(rest.split("=", 1) for kw, rest in dockerfile() if kw == "ARG" and "=" in rest)

    def base(stage: list[tuple[str, str]]) -> str:
        image = stage[0][1].split()[0]
        return args.get(image.strip("${}"), image)

    assert base(stages[-1]) == "python:3.11-slim"
    builder = stages[0][0][1].split()[-1]
    assert any(kw == "COPY" and f"--from={builder}" in rest for kw, rest in stages[-1])


def test_dockerfile_runs_as_a_user_that_is_not_root() -> None:
    user = only(dockerfile_stages()[-1], "USER").split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_entrypoint_is_promptq_and_its_command_serves_the_api_outside() -> None:
    assert dockerfile_entrypoint() == ["promptq"]
    ctx = parse_cli(dockerfile_cmd())
    assert leaf(ctx) == "api"
    # The CLI's default, 127.0.0.1, cannot be reached from outside the container.
    assert ctx.params["host"] == "0.0.0.0"


def test_dockerfile_healthcheck_probes_healthz_on_the_api_port() -> None:
    healthcheck = only(dockerfile_stages()[-1], "HEALTHCHECK")
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    port = parse_cli(dockerfile_cmd()).params["port"]
    assert any(f"127.0.0.1:{port}/healthz" in part for part in probe)


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    sources = {
        source.rstrip("/")
        for kw, rest in dockerfile_stages()[0]
        if kw == "COPY"
        for source in rest.split()[:-1]
        if not source.startswith("--")
    }
    for needed in [*packages, pyproject["project"]["readme"], "pyproject.toml"]:
        assert needed in sources, f"the builder does not COPY {needed}"
        assert (REPO / needed).exists()
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not ignored & sources
    assert {".venv", ".git", "promptq.db", ".promptq", ".env"} <= ignored


# ---------------------------------------------------------------------------- YAML


def yaml_files() -> list[Path]:
    return [p for p in deploy_files() if p.suffix in {".yml", ".yaml"}]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)


# ---------------------------------------------------------------------------- Compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def promptq_services() -> dict[str, dict[str, Any]]:
    """Those that run the image built from deploy/Dockerfile."""
    image = (DEPLOY / "Dockerfile").resolve()
    found = {}
    for name, service in services().items():
        build = service.get("build")
        built = isinstance(build, dict) and DEPLOY / build["context"] / build["dockerfile"]
        if built and built.resolve() == image:
            found[name] = service
    return found


def compose_argv(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint", dockerfile_entrypoint())
    entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else entrypoint
    assert entrypoint == ["promptq"]
    command = service.get("command", dockerfile_cmd())
    return shlex.split(command) if isinstance(command, str) else list(command)


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_compose_has_every_service_and_the_image_runs_them() -> None:
    assert {"postgres", "redis", *PROMPTQ_SERVICES} <= set(services())
    assert set(promptq_services()) == PROMPTQ_SERVICES
    roles = {name: leaf(parse_cli(compose_argv(s))) for name, s in promptq_services().items()}
    assert roles == {
        "migrate": "db upgrade",
        "api": "api",
        "worker": "worker",
        "beat": "beat",
        "flower": "flower",
    }


def test_compose_health_checks() -> None:
    svc = services()
    assert "pg_isready" in healthcheck_text(svc["postgres"])
    assert "redis-cli ping" in healthcheck_text(svc["redis"])
    port = parse_cli(compose_argv(svc["api"])).params["port"]
    assert f"127.0.0.1:{port}/readyz" in healthcheck_text(svc["api"])
    # The image's own check probes the API's port: every other role replaces or disables it.
    for name, service in promptq_services().items():
        assert "healthcheck" in service, name


def condition(service: dict[str, Any], dependency: str) -> str:
    depends_on = service.get("depends_on", {})
    if isinstance(depends_on, list):
        return "service_started" if dependency in depends_on else ""
    return depends_on.get(dependency, {}).get("condition", "")


def test_compose_starts_everything_in_order() -> None:
    svc = services()
    assert condition(svc["migrate"], "postgres") == "service_healthy"
    assert condition(svc["pgbouncer"], "postgres") == "service_healthy"
    for name in ("migrate", "api", "worker", "beat"):
        assert condition(svc[name], "pgbouncer") == "service_healthy", name
    for name in ("api", "worker", "beat"):
        assert condition(svc[name], "migrate") == "service_completed_successfully", name
        assert condition(svc[name], "postgres") == "service_healthy", name
        assert condition(svc[name], "redis") == "service_healthy", name
    assert condition(svc["flower"], "redis") == "service_healthy"
    # A one-shot restarted after exiting 0 would never count as completed.
    assert str(svc["migrate"].get("restart", "no")) in {"no", "on-failure"}


def test_compose_redis_never_evicts_and_persists() -> None:
    command = services()["redis"]["command"]
    args = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[0] == "redis-server"
    assert options["--maxmemory-policy"] == "noeviction"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert services()["redis"]["volumes"]


def test_compose_processes_get_the_env_file_and_the_bundled_services() -> None:
    for name, service in promptq_services().items():
        env_file = service["env_file"]
        assert ".env" in ([env_file] if isinstance(env_file, str) else env_file), name
        environment = service["environment"]
        # PostgreSQL through PgBouncer, with the prepared statements a pooler needs off.
        assert "@pgbouncer:5432/" in environment["PROMPTQ_DATABASE_URL"], name
        assert environment["PROMPTQ_DATABASE_POOLER"] == "pgbouncer", name
        assert environment["PROMPTQ_REDIS_URL"].startswith("redis://redis:6379"), name


def test_compose_pgbouncer_pools_transactions_in_front_of_postgres() -> None:
    pgbouncer = services()["pgbouncer"]
    environment = pgbouncer["environment"]
    assert environment["DB_HOST"] == "postgres"
    assert environment["POOL_MODE"] == "transaction"
    assert int(environment["MAX_DB_CONNECTIONS"]) <= 90  # under PostgreSQL's default 100
    assert "pg_isready" in healthcheck_text(pgbouncer)


def test_compose_workers_scale_and_beat_does_not() -> None:
    worker, beat = services()["worker"], services()["beat"]
    # Either would make `--scale worker=N` collide.
    assert "container_name" not in worker and "ports" not in worker
    assert "replicas" in worker.get("deploy", {})
    assert beat.get("deploy", {}).get("replicas", 1) == 1


def test_compose_flower_requires_basic_auth_and_listens_outside() -> None:
    flower = services()["flower"]
    required = flower["environment"]["PROMPTQ_FLOWER_BASIC_AUTH"]
    assert re.fullmatch(r"\$\{PROMPTQ_FLOWER_BASIC_AUTH:\?.+\}", required)
    assert parse_cli(compose_argv(flower)).params["address"] == "0.0.0.0"


def test_compose_api_listens_outside_on_its_published_port() -> None:
    api = services()["api"]
    params = parse_cli(compose_argv(api)).params
    assert params["host"] == "0.0.0.0"
    assert any(str(p).endswith(f":{params['port']}") for p in api["ports"])


def test_compose_interpolated_variables_are_in_env_example() -> None:
    text = (DEPLOY / "compose.yml").read_text()
    listed = {name for name, _, _ in env_example()}
    for variable in set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)):
        assert variable in listed, variable


# ---------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_documents() if d["kind"] == kind]


def runs_promptq(document: dict[str, Any]) -> bool:
    """A Deployment or Job of the promptq image (not PgBouncer's)."""
    spec = document["spec"]["template"]["spec"]
    return all(c["image"].split(":")[0] == "promptq" for c in all_containers(spec))


def promptq_of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(kind) if runs_promptq(d)]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """The pods that run promptq."""
    for document in promptq_of_kind("Deployment") + promptq_of_kind("Job"):
        yield document["metadata"]["name"], document["spec"]["template"]["spec"]


def k8s_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command", dockerfile_entrypoint())
    assert command[:1] == ["promptq"]
    return [*command[1:], *container.get("args", dockerfile_cmd())]


def deployment_running(role: str) -> dict[str, Any]:
    found = [
        d
        for d in promptq_of_kind("Deployment")
        if leaf(parse_cli(k8s_argv(d["spec"]["template"]["spec"]["containers"][0]))) == role
    ]
    assert len(found) == 1, role
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.y*ml")} - {"kustomization.yaml"}
    examples = {name for name in manifests if name.endswith(".example.yaml")}
    assert sorted(kustomization["resources"]) == sorted(manifests - examples)
    # Manifests without a namespace, so that `apply -n` puts them anywhere.
    assert "namespace" not in kustomization
    assert all("namespace" not in d["metadata"] for d in k8s_documents())


def test_k8s_every_role_is_there() -> None:
    for role in ("api", "worker", "beat", "flower"):
        deployment_running(role)
    jobs = [
        leaf(parse_cli(k8s_argv(j["spec"]["template"]["spec"]["containers"][0])))
        for j in of_kind("Job")
    ]
    assert jobs == ["db upgrade"]


def test_k8s_beat_is_one_and_recreated() -> None:
    beat = deployment_running("beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"


def scaled_object() -> dict[str, Any]:
    (scaler,) = of_kind("ScaledObject")
    return scaler


def config_map() -> dict[str, str]:
    (config,) = of_kind("ConfigMap")
    return config["data"]


def exposed_metric_names() -> set[str]:
    """Every metric family promptq's /metrics may show: the names promptq.metrics builds."""
    source = (REPO / "promptq" / "metrics.py").read_text()
    return set(re.findall(r'"(promptq_[a-z_]+)"', source))


def test_k8s_keda_scales_the_workers_on_their_backlog() -> None:
    scaler = scaled_object()
    assert scaler["apiVersion"] == "keda.sh/v1alpha1"
    # KEDA makes the HorizontalPodAutoscaler itself: a second one would fight it.
    assert not of_kind("HorizontalPodAutoscaler")
    worker = deployment_running("worker")
    spec = scaler["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", worker["metadata"]["name"])
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] >= 60
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # One pod per PROMPTQ_WORKER_CONCURRENCY jobs: as many as its threads take at once.
    assert trigger["metadata"]["threshold"] == config_map()["PROMPTQ_WORKER_CONCURRENCY"]
    # The count is KEDA's; a replicas field would be reset by every apply.
    assert "replicas" not in worker["spec"]


def test_k8s_keda_query_reads_only_what_metrics_exposes() -> None:
    from promptq.models import JobStatus

    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    used = set(re.findall(r"\bpromptq_[a-z_]+", query))
    assert used <= exposed_metric_names(), used - exposed_metric_names()
    # What waits: the broker's messages (every priority list, summed by the gauge) and the
    # limiter's queue; not CPU.
    assert {"promptq_broker_backlog_messages", "promptq_limiter_waiting_jobs"} <= used
    statuses = set(re.findall(r'status="([a-z]+)"', query))
    assert statuses <= {str(s) for s in JobStatus}


def test_the_broker_lists_named_in_deploy_are_every_priority_list() -> None:
    """The gauge the ScaledObject reads sums these lists (tests/stack/test_metrics.py); a
    KEDA `redis` trigger, the README's alternative, must list every one of them."""
    from promptq.broker.celery_app import QUEUE
    from promptq.priority import Priority

    sep = ":"
    lists = {
        QUEUE if p.broker_priority == 0 else f"{QUEUE}{sep}{p.broker_priority}" for p in Priority
    }
    readme = (DEPLOY / "README.md").read_text()
    named = set(re.findall(rf"`({re.escape(QUEUE)}(?::\d+)?)`", readme))
    assert named == lists
    for name in lists:
        assert name in (K8S / "keda.yaml").read_text()


def test_k8s_containers_reference_existing_config_and_secrets() -> None:
    keys = {
        ("ConfigMap", d["metadata"]["name"]): set(d.get("data", {})) for d in of_kind("ConfigMap")
    } | {
        ("Secret", d["metadata"]["name"]): set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in of_kind("Secret")
    }
    for name, spec in pod_specs():
        for container in all_containers(spec):
            sources = [(e.get("configMapRef"), "ConfigMap") for e in container.get("envFrom", [])]
            sources += [(e.get("secretRef"), "Secret") for e in container.get("envFrom", [])]
            referenced = {(kind, ref["name"]) for ref, kind in sources if ref}
            assert ("ConfigMap", "promptq-config") in referenced, name
            assert ("Secret", "promptq-secrets") in referenced, name
            for variable in container.get("env", []):
                source = variable.get("valueFrom", {})
                for ref_key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if ref_key in source:
                        ref = (kind, source[ref_key]["name"])
                        referenced.add(ref)
                        assert source[ref_key]["key"] in keys[ref], (name, variable["name"])
            assert referenced <= set(keys), (name, referenced - set(keys))


def test_kustomization_applies_no_placeholder() -> None:
    """`kubectl apply -k` must not create a Secret of REPLACE-ME values that `promptq api`
    would then start with: the Secret is made out of band, as the comment says."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert "REPLACE-ME" not in (K8S / name).read_text(), name
    assert (
        "kubectl create secret generic promptq-secrets" in (K8S / "kustomization.yaml").read_text()
    )


def test_k8s_secret_values_are_marked_placeholders() -> None:
    (secret,) = of_kind("Secret")
    assert secret["stringData"]
    for key, value in secret["stringData"].items():
        assert "REPLACE-ME" in value, key


def test_k8s_flower_requires_its_basic_auth() -> None:
    container = deployment_running("flower")["spec"]["template"]["spec"]["containers"][0]
    env = {v["name"]: v for v in container.get("env", [])}
    ref = env["PROMPTQ_FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional", False)


def test_k8s_pods_run_as_non_root_with_resources() -> None:
    image_uid = int(only(dockerfile_stages()[-1], "USER").split(":")[0])
    for name, spec in pod_specs():
        pod_security = spec.get("securityContext", {})
        assert spec.get("enableServiceLinks") is False, name  # PROMPTQ_API_* would appear
        for container in all_containers(spec):
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, name
            assert security.get("runAsUser", image_uid) == image_uid, name
            assert security.get("allowPrivilegeEscalation") is False, name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (name, kind)


def test_k8s_commands_listen_where_the_probes_and_services_look() -> None:
    for role, flag in (("api", "host"), ("flower", "address")):
        container = deployment_running(role)["spec"]["template"]["spec"]["containers"][0]
        params = parse_cli(k8s_argv(container)).params
        assert params[flag] == "0.0.0.0", role
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert params["port"] in ports.values(), role
    api = deployment_running("api")["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"] for p in api["ports"]} | {p["containerPort"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["port"] in ports


def test_k8s_services_select_a_deployment_and_its_port() -> None:
    names = set()
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [
            d
            for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, service["metadata"]["name"]
        container = matches[0]["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"] for p in container["ports"]} | {
            p["containerPort"] for p in container["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
        if runs_promptq(matches[0]):
            names.add(leaf(parse_cli(k8s_argv(container))))
        else:
            names.add(container["name"])
    assert names == {"api", "flower", "pgbouncer"}


def test_k8s_pgbouncer_pools_transactions_for_every_promptq_pod() -> None:
    (pgbouncer,) = [d for d in of_kind("Deployment") if not runs_promptq(d)]
    spec = pgbouncer["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"].split(":")[0].endswith("pgbouncer")
    env = {v["name"]: v for v in container["env"]}
    assert env["POOL_MODE"]["value"] == "transaction"
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "promptq-secrets",
        "key": "POSTGRES_URL",
    }
    # PostgreSQL's default of 100 is never reached, however many promptq pods run.
    per_replica = int(env["MAX_DB_CONNECTIONS"]["value"])
    assert per_replica * pgbouncer["spec"]["replicas"] <= 90
    security = {**spec["securityContext"], **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    # promptq goes through it, and knows it does.
    (service,) = [s for s in of_kind("Service") if s["metadata"]["name"] == "promptq-pgbouncer"]
    (secret,) = of_kind("Secret")
    url = secret["stringData"]["PROMPTQ_DATABASE_URL"]
    assert f"@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/" in url
    (config,) = of_kind("ConfigMap")
    assert config["data"]["PROMPTQ_DATABASE_POOLER"] == "pgbouncer"


def test_k8s_beat_writes_its_schedule_to_a_volume() -> None:
    spec = deployment_running("beat")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    schedule = Path(parse_cli(k8s_argv(container)).params["schedule"])
    assert schedule.is_absolute()
    mounts = {Path(m["mountPath"]) for m in container.get("volumeMounts", [])}
    assert schedule.parent in mounts


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_renders() -> None:
    """`kubectl kustomize` builds the manifests offline; it talks to no cluster."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    # The Secret is created out of band (secret.example.yaml shows its keys).
    assert kinds == sorted(d["kind"] for d in k8s_documents() if d["kind"] != "Secret")


# ---------------------------------------------------------------------------- systemd


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string((SYSTEMD / name).read_text(), source=name)
    return parser


def exec_argv(value: str) -> list[str]:
    """An Exec*= line's command: systemd's prefixes (-, @, :, +, !) dropped."""
    argv = shlex.split(value)
    argv[0] = argv[0].lstrip("-@:+!")
    return argv


def unit_promptq_argv(name: str) -> list[str]:
    argv = exec_argv(unit(name)["Service"]["ExecStart"])
    assert Path(argv[0]).name == "promptq" and Path(argv[0]).is_absolute(), argv
    return argv[1:]


def test_systemd_units_are_all_there() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == SYSTEMD_UNITS
    assert list(SYSTEMD.glob("README*"))


@pytest.mark.parametrize("name", sorted(SYSTEMD_UNITS))
def test_systemd_unit_is_hardened_and_reads_the_env_file(name: str) -> None:
    parsed = unit(name)
    assert {"Unit", "Service", "Install"} <= set(parsed.sections())
    service = parsed["Service"]
    assert service["User"] == "promptq"
    assert service["EnvironmentFile"] == "/etc/promptq/promptq.env"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    leaf(parse_cli(unit_promptq_argv(name)))


@pytest.mark.parametrize("name", sorted(SYSTEMD_UNITS - {"promptq-migrate.service"}))
def test_systemd_units_restart_and_come_after_the_migration(name: str) -> None:
    parsed = unit(name)
    assert parsed["Service"]["Restart"] == "on-failure"
    assert "promptq-migrate.service" in parsed["Unit"]["Requires"].split()
    assert "promptq-migrate.service" in parsed["Unit"]["After"].split()


def test_systemd_roles() -> None:
    roles = {name: leaf(parse_cli(unit_promptq_argv(name))) for name in SYSTEMD_UNITS}
    assert roles == {
        "promptq-api.service": "api",
        "promptq-worker@.service": "worker",
        "promptq-beat.service": "beat",
        "promptq-flower.service": "flower",
        "promptq-migrate.service": "db upgrade",
    }
    migrate = unit("promptq-migrate.service")["Service"]
    assert migrate["Type"] == "oneshot"
    assert migrate["RemainAfterExit"] == "yes"


def test_systemd_worker_instances_get_node_names_of_their_own() -> None:
    params = parse_cli(unit_promptq_argv("promptq-worker@.service")).params
    assert "%i" in params["hostname"]


def test_systemd_beat_may_write_its_schedule_and_nobody_else_writes() -> None:
    schedule = Path(parse_cli(unit_promptq_argv("promptq-beat.service")).params["schedule"])
    writable = unit("promptq-beat.service")["Service"].get("ReadWritePaths", "").split()
    assert any(schedule.is_relative_to(path.lstrip("-")) for path in writable)
    for name in SYSTEMD_UNITS - {"promptq-beat.service"}:
        assert "ReadWritePaths" not in unit(name)["Service"], name


def test_systemd_flower_refuses_to_start_without_basic_auth() -> None:
    pre = unit("promptq-flower.service")["Service"]["ExecStartPre"]
    # $$: the shell expands it, so systemd never puts the secret on a command line.
    assert "$$PROMPTQ_FLOWER_BASIC_AUTH" in pre


def test_systemd_exec_lines_name_real_commands() -> None:
    """Every Exec*= line that runs promptq, ExecStartPre and the like included."""
    for name in SYSTEMD_UNITS:
        for key, value in unit(name)["Service"].items():
            if key.startswith("Exec"):
                argv = exec_argv(value)
                if Path(argv[0]).name == "promptq":
                    parse_cli(argv[1:])


# ---------------------------------------------------------------------------- all of them


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_deployment_waits_for_the_schema() -> None:
    """Pods start only once the migration Job has run: `promptq db check --wait`."""
    for deployment in promptq_of_kind("Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        waits = [k8s_argv(c)[:2] for c in spec.get("initContainers", [])]
        assert ["db", "check"] in waits, deployment["metadata"]["name"]


def promptq_invocations() -> list[tuple[str, list[str]]]:
    """Every `promptq ...` the deploy files run, with where it comes from."""
    found = [("Dockerfile CMD", dockerfile_cmd())]
    found += [(f"compose {n}", compose_argv(s)) for n, s in promptq_services().items()]
    for name, spec in pod_specs():
        found += [(f"k8s {name}/{c['name']}", k8s_argv(c)) for c in all_containers(spec)]
    found += [(f"systemd {name}", unit_promptq_argv(name)) for name in sorted(SYSTEMD_UNITS)]
    return found


INVOCATIONS = promptq_invocations()


@pytest.mark.parametrize(("where", "argv"), INVOCATIONS, ids=[w for w, _ in INVOCATIONS])
def test_every_promptq_invocation_parses(where: str, argv: list[str]) -> None:
    try:
        parse_cli(argv)
    except click.UsageError as exc:
        pytest.fail(f"{where}: promptq {shlex.join(argv)}: {exc.format_message()}")


def test_the_cli_help_runs_for_every_command_used() -> None:
    """The same commands through the installed console script, as the images run them."""
    executable = Path(sys.executable).parent / "promptq"
    if not executable.exists():
        pytest.skip(f"no {executable}")
    for command in sorted({leaf(parse_cli(argv)) for _, argv in INVOCATIONS}):
        result = subprocess.run(
            [str(executable), *command.split(), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (command, result.stderr)


# ---------------------------------------------------------------------------- shutdown


def test_every_worker_gets_longer_to_stop_than_its_longest_call() -> None:
    """A worker's warm shutdown finishes its calls in flight; one cut off by the kill is
    paid for twice. Each deployment's grace period outlasts its upstream timeout, with a
    margin for the call's record: a scale-down pays for nothing twice."""
    from promptq.config import Settings

    margin = 30
    default = Settings.model_fields["upstream_timeout_seconds"].default
    setting = "PROMPTQ_UPSTREAM_TIMEOUT_SECONDS"
    # Compose and systemd read .env (from .env.example); Kubernetes its ConfigMap.
    env_timeout = float(dict((n, v) for n, v, _ in env_example())[setting])
    assert env_timeout == default
    k8s_timeout = float(config_map().get(setting, default))

    grace = services()["worker"]["stop_grace_period"]
    assert grace.endswith("m") and int(grace[:-1]) * 60 >= env_timeout + margin
    worker = deployment_running("worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= k8s_timeout + margin
    stop = unit("promptq-worker@.service")["Service"]["TimeoutStopSec"]
    assert int(stop) >= env_timeout + margin


def test_compose_pgbouncer_takes_the_connections_of_scaled_workers() -> None:
    """The API, beat and `--scale worker=4` at pool + overflow connections each, with room,
    reach PgBouncer; PostgreSQL sees only PgBouncer's few, under its max_connections."""
    from promptq.config import Settings

    fields = Settings.model_fields
    per_process = fields["database_pool_size"].default + fields["database_max_overflow"].default
    pgbouncer = services()["pgbouncer"]["environment"]
    assert int(pgbouncer["MAX_CLIENT_CONN"]) >= (2 + 4) * per_process * 2
    command = services()["postgres"].get("command", [])
    limits = [int(a.split("=")[1]) for a in command if a.startswith("max_connections=")]
    max_connections = limits[0] if limits else 100  # PostgreSQL's default
    # Room beside PgBouncer's for psql, a backup and a direct migration.
    assert int(pgbouncer["MAX_DB_CONNECTIONS"]) + 10 <= max_connections


def test_compose_publishes_no_port_to_the_world_by_default() -> None:
    """/metrics and the API answer on the API's port: loopback unless the operator says
    otherwise (API_ADDRESS), like Flower's."""
    for name, service in services().items():
        for port in service.get("ports", []):
            published = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(port))
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} to the world"
