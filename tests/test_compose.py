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
    assert services["server"]["healthcheck"]["test"][-2:] == ["--service", "readiness"]
    # Qdrant: an API key (required: compose refuses to start without QDRANT_API_KEY), used by both raee
    # services; its ports published on this host only; healthy when /readyz answers 200, not when a
    # TCP port merely opens.
    qdrant = services["qdrant"]
    assert qdrant["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${QDRANT_API_KEY:?")
    assert env["RAEE_QDRANT_API_KEY"] == qdrant["environment"]["QDRANT__SERVICE__API_KEY"]
    assert all(port.startswith("127.0.0.1:") for port in qdrant["ports"])
    assert "/readyz" in " ".join(qdrant["healthcheck"]["test"]) and " 200 " in qdrant["healthcheck"]["test"][-1]
    assert services["server"]["image"] == services["migrate"]["image"] == "raee-serve:0.1.0"
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
    # Every node ready before the server starts (and the server counts the peers itself: below).
    assert cluster["server"]["depends_on"] == {"qdrant-2": {"condition": "service_healthy"},
                                               "qdrant-3": {"condition": "service_healthy"}}
    for node in ("qdrant-2", "qdrant-3"):
        assert "/readyz" in " ".join(cluster[node]["healthcheck"]["test"])
        assert cluster[node]["depends_on"] == {"qdrant": {"condition": "service_healthy"}}
        assert cluster[node]["environment"]["QDRANT__SERVICE__API_KEY"].startswith("${QDRANT_API_KEY:?")


def test_the_image_builds_dependencies_first_and_runs_as_a_user_with_a_health_check() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert sum(line.startswith("FROM ") for line in lines) == 2  # build stage, then a clean runtime stage
    first_source = next(i for i, line in enumerate(lines) if line.startswith("COPY raee_server"))
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    assert torch < first_source  # a code change does not reinstall torch
    install = next(line for line in lines if "pip install --no-deps" in line)
    assert "/wheels/raee_serve-" in install and " -e " not in install  # the built wheel, not the checkout
    runtime = lines[next(i for i, line in enumerate(lines) if line.startswith("FROM ") and i > 0):]
    user = next(line for line in runtime if line.startswith("USER "))
    assert user.split()[1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") for line in runtime)


class _Cluster:
    """What qdrant-client's cluster_status answers, as a test double: the peer count decision alone."""

    def __init__(self, status: str, peers: int) -> None:
        self.status, self.peers = status, {str(i): object() for i in range(peers)}

    def cluster_status(self) -> _Cluster:
        return self


def test_a_replicated_collection_waits_for_the_cluster_peers() -> None:
    import pytest

    from raee_server.errors import NotReady
    from raee_server.stores.vectors import check_peers

    with pytest.raises(NotReady, match="1 peer.*replication factor 2"):
        check_peers(_Cluster("enabled", 1), 2)
    with pytest.raises(NotReady, match="disabled"):
        check_peers(_Cluster("disabled", 0), 2)
    check_peers(_Cluster("enabled", 3), 2)  # enough peers: no error


def test_the_replicas_variant_adds_a_second_server_sharing_the_stores_and_the_key_file() -> None:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    replicas = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())["services"]
    second = replicas["server-2"]
    assert replicas["server"]["environment"]["RAEE_REPLICA_ID"] != second["environment"]["RAEE_REPLICA_ID"]
    shared = ("RAEE_DATABASE_URL", "RAEE_QDRANT_URL", "RAEE_MODEL_CACHE", "RAEE_API_KEYS_FILE")
    assert {k: second["environment"][k] for k in shared} == {k: base["server"]["environment"][k] for k in shared}
    assert second["environment"]["RAEE_QDRANT_API_KEY"].startswith("${QDRANT_API_KEY:?")
    assert second["image"] == base["server"]["image"] and second["secrets"] == base["server"]["secrets"]
    assert second["healthcheck"]["test"] == base["server"]["healthcheck"]["test"]
    published = {p.split(":")[0] for s in (base["server"], second) for p in s["ports"]}
    assert len(published) == len(base["server"]["ports"]) + len(second["ports"])  # no host port twice
    assert second["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
