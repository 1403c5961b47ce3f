"""deploy/: what operators run must agree with the worker's own configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from worker.config import Settings, load_settings

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
        assert grace > settings.shutdown_timeout, "SIGKILL must not cut the drain short"


def test_dockerfile_runs_the_worker_itself_without_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert "USER 10001" in final_stage
    assert 'ENTRYPOINT ["worker"]' in final_stage  # exec form: SIGTERM reaches the worker
    assert '"worker", "check"' in final_stage.split("HEALTHCHECK", 1)[1]
    assert "PYTHONUNBUFFERED=1" in final_stage
