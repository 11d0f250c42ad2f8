"""The compose files parse, and wire the services as documented (they cannot run here: no Docker engine)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_dependencies_and_health_checks() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"qdrant", "postgres", "migrate", "server"}
    for name in ("qdrant", "postgres", "server"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["command"] == ["raee-admin", "migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["server"]["depends_on"] == {"qdrant": {"condition": "service_healthy"},
                                               "migrate": {"condition": "service_completed_successfully"}}
    env = services["server"]["environment"]
    assert env["RAEE_QDRANT_URL"] == "http://qdrant:6333" and env["RAEE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["server"]["healthcheck"]["test"][:3] == ["CMD", "raee-admin", "health"]
    assert set(compose["volumes"]) == {"qdrant-data", "pg-data", "models"}
    # Bound to 0.0.0.0, so API keys are on (the server refuses an open address without them).
    assert env["RAEE_ADDRESS"].startswith("0.0.0.0:") and "RAEE_ALLOW_UNAUTHENTICATED" not in env
    assert env["RAEE_API_KEYS_FILE"] == "/run/secrets/raee_api_keys"
    assert services["server"]["secrets"] == ["raee_api_keys"]
    assert compose["secrets"]["raee_api_keys"]["file"] == "./secrets/api-keys.toml"


def test_cluster_variant_adds_two_nodes_with_replication() -> None:
    cluster = yaml.safe_load((ROOT / "docker-compose.cluster.yml").read_text())["services"]
    assert {"qdrant-2", "qdrant-3"} <= set(cluster)
    for node in ("qdrant-2", "qdrant-3"):
        assert "--bootstrap" in cluster[node]["command"]
    assert cluster["server"]["environment"]["RAEE_QDRANT_REPLICATION_FACTOR"] == "2"
    assert set(cluster["server"]["depends_on"]) == {"qdrant-2", "qdrant-3"}
