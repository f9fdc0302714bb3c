"""docker-compose.yml cannot run here (no Docker engine), so check it as data: its structure,
that every command exists in our CLI with the options it uses, and that every TANDEM_
variable is a setting."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
import pytest
import typer.main
import yaml

from pipeline.settings import Settings
from services.cli import app

ROOT = Path(__file__).parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_top_level_shape():
    assert set(COMPOSE) <= {"services", "volumes", "secrets", "networks", "configs", "name"} | \
        {k for k in COMPOSE if k.startswith("x-")}
    assert {"redis", "api", "worker-nlu", "worker-gen", "flower"} <= set(SERVICES)
    assert "vllm" in SERVICES and SERVICES["vllm"]["profiles"] == ["vllm"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_is_complete(name):
    service = SERVICES[name]
    assert "image" in service or "build" in service
    for dependency in service.get("depends_on", {}):
        assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        assert source.startswith(("/", ".")) or source in COMPOSE["volumes"], f"undeclared volume {source}"
    for secret in service.get("secrets", []):
        assert secret in COMPOSE["secrets"]
        assert (ROOT / COMPOSE["secrets"][secret]["file"]).is_file()
    if name != "vllm":
        test = service.get("healthcheck", {}).get("test", [None])
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name} needs a healthcheck"
        # The exec form runs no shell: "$HOSTNAME" reached celery as it is, and matched no worker.
        assert test[0] == "CMD-SHELL" or not any("$" in arg for arg in test[1:]), f"{name}'s test expands nothing"


def cli_command(args: list[str]) -> click.Command:
    group = typer.main.get_command(app)
    command = group.commands.get(args[1])
    assert command is not None, f"`tandem {args[1]}` does not exist"
    return command


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if s.get("command", [""])[0] == "tandem"))
def test_tandem_commands_exist_with_their_options(name):
    args = SERVICES[name]["command"]
    command = cli_command(args)
    known = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for arg in args[2:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"`tandem {args[1]}` has no option {arg}"


def test_celery_commands_point_at_our_app():
    import importlib

    for name, service in SERVICES.items():
        command = service.get("command", [])
        if command[:1] == ["celery"]:
            module = command[command.index("-A") + 1]
            assert importlib.import_module(module).app.main == "tandem", name
    for name, service in SERVICES.items():
        test = healthcheck_args(service)
        if "celery" in test:
            assert test[test.index("-A") + 1] == "workers.app", name


def healthcheck_args(service: dict) -> list[str]:
    """The healthcheck's command as its process gets it: compose turns "$$" into "$"; in a
    shell, "$HOSTNAME" is the container's host name."""
    test = service.get("healthcheck", {}).get("test", [])
    if test[:1] == ["CMD-SHELL"]:
        return [arg.replace("$$HOSTNAME", "<host>") for arg in shlex.split(test[1])]
    return [arg.replace("$$", "$") for arg in test[1:]]


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if "worker" in s.get("command", [])))
def test_a_worker_healthcheck_pings_the_node_the_worker_runs_as(name):
    # `tandem worker` names its node "<queues>@%h", %h being the host name.
    command = SERVICES[name]["command"]
    queues = command[command.index("--queues") + 1]
    args = healthcheck_args(SERVICES[name])
    assert args[args.index("-d") + 1] == f"{queues}@<host>", name


def test_flower_is_published_on_this_host_only():
    # Its pages list every task's arguments: customer messages, with no login.
    assert all(port.startswith("127.0.0.1:") for port in SERVICES["flower"]["ports"])


def test_every_tandem_variable_is_a_setting():
    fields = {f"TANDEM_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}) or {}:
            if variable.startswith("TANDEM_"):
                assert variable in fields, f"{name} sets {variable}, which no setting reads"


def test_dockerfile_default_command_is_a_cli_command():
    cmd = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD"))
    args = yaml.safe_load(cmd[4:])
    cli_command(args)
