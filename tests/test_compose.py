"""docker-compose.yml and the Dockerfile: structure checked with PyYAML, and the file validated by
``docker compose config`` where the compose client exists. Nothing here needs (or starts) a Docker
engine: the compose file is checked, not run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml  # the dev extra

from app.settings import Settings
from pruning.data import FASHION_MNIST_ENV

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE list form
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: dict) -> list[dict]:
    """Each volume entry as {type, source, target, read_only} (short or long syntax)."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if source.startswith((".", "/", "$", "~")) else "volume"
            out.append({"type": kind, "source": source, "target": target, "read_only": ro})
        else:
            out.append({"type": v.get("type", "volume"), "source": v.get("source"),
                        "target": v["target"], "read_only": bool(v.get("read_only"))})
    return out


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def test_services_and_ordering(compose):
    services = compose["services"]
    assert set(services) >= {"postgres", "migrate", "api", "worker"}

    pg = services["postgres"]
    assert str(pg["image"]).startswith("postgres:16")
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    pg_volumes = [m for m in _mounts(pg) if m["type"] == "volume"]
    assert pg_volumes and all(m["source"] in compose["volumes"] for m in pg_volumes)

    assert _command(services["migrate"]) == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no"  # runs once

    api = services["api"]
    assert _command(api) == ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert any(str(p).endswith("8000") for p in api["ports"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"])

    worker = services["worker"]
    assert _command(worker)[0] == "worker"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker  # would forbid replicas / --scale

    images = {services[s]["image"] for s in APP_SERVICES}
    assert len(images) == 1  # one image, built from the Dockerfile
    assert all(services[s].get("build") for s in APP_SERVICES)


def test_shared_artifact_volume(compose):
    services = compose["services"]
    assert "artifacts" in compose["volumes"]
    targets = {}
    for name in ("api", "worker"):
        env = _env(services[name])
        mounts = [m for m in _mounts(services[name]) if m["source"] == "artifacts"]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume" and not mounts[0]["read_only"]
        assert env["METAPRUNE_ARTIFACT_DIR"] == mounts[0]["target"]
        targets[name] = mounts[0]["target"]
    assert targets["api"] == targets["worker"]


def test_database_auth_and_datasets(compose):
    services = compose["services"]
    for name in APP_SERVICES:
        url = _env(services[name])["METAPRUNE_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres:5432/" in url
    for name in ("api", "worker"):
        env = _env(services[name])
        assert env["METAPRUNE_REQUIRE_AUTH"].lower() == "true"
        roots = Settings.model_validate_json(
            '{"dataset_roots": %s}' % env["METAPRUNE_DATASET_ROOTS"]).dataset_roots
        ro_targets = {m["target"] for m in _mounts(services[name]) if m["read_only"]}
        assert roots and all(str(r) in ro_targets for r in roots)
        fm = Path(env[FASHION_MNIST_ENV])
        assert any(fm.is_relative_to(r) for r in roots)


def test_env_names_are_real_settings(compose):
    fields = {f"METAPRUNE_{name.upper()}" for name in Settings.model_fields}
    allowed = fields | {FASHION_MNIST_ENV}
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith("METAPRUNE_"):
                assert key in allowed, f"{name}: {key} is not a Settings field"


def test_env_values_parse_as_settings(compose, monkeypatch):
    """The api's METAPRUNE_* values load through pydantic-settings (JSON list, bool, ...)."""
    for key in list(os.environ):
        if key.startswith("METAPRUNE_"):
            monkeypatch.delenv(key)
    for key, value in _env(compose["services"]["api"]).items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.require_auth is True
    assert s.database_url.startswith("postgresql+psycopg://")
    assert [str(p) for p in s.dataset_roots] == ["/datasets"]


def test_dockerfile_and_dockerignore():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert 'ENTRYPOINT ["metaprune"]' in text
    assert "\nUSER " in text and "USER root" not in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", "runs/", ".data/", ".whl/", ".pytest_cache/", ".hypothesis/", "*.db"):
        assert entry in ignore


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        try:
            r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            r = None
        if r is not None and r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config():
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no docker compose client (`docker compose version` failed and no "
                    "docker-compose): the compose file is only checked structurally above")
    env = {**os.environ, "DATASETS_DIR": str(ROOT)}  # any existing folder
    r = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value, roots", [
    ('["/datasets", "/more"]', ["/datasets", "/more"]),
    ("/usr/share/datasets", ["/usr/share/datasets"]),
    ("/a:/b:", ["/a", "/b"]),
    ("", []),
])
def test_dataset_roots_from_the_environment_as_json_or_as_a_path_list(monkeypatch, value, roots):
    monkeypatch.setenv("METAPRUNE_DATASET_ROOTS", value)
    assert [str(p) for p in Settings().dataset_roots] == roots
