"""The client needs neither torch nor the model stack: a venv with only grpcio, protobuf and the
google protos (the base install's dependencies) imports `raee.client` and calls a real server."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import google.protobuf
import grpc
import typing_extensions  # grpcio's one dependency

from raee.types import Prediction

from .grpc_harness import ServerThread
from .test_grpc import make_settings, tiny_engine_factory

ROOT = Path(__file__).resolve().parents[1]


def client_only_python(tmp_path: Path) -> Path:
    """A fresh venv (no system site-packages) that sees only the base install's packages: grpcio (and
    typing-extensions), protobuf with the google.rpc protos, and `raee` itself."""
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env)
    packages = tmp_path / "packages"
    packages.mkdir()
    google_dir = Path(google.protobuf.__file__).parents[1]  # google/ holds protobuf and the rpc protos
    for source in (Path(grpc.__file__).parent, google_dir, Path(typing_extensions.__file__), ROOT / "raee"):
        (packages / source.name).symlink_to(source)
    [site] = list((env / "lib").glob("python*/site-packages"))
    (site / "base-install.pth").write_text(f"{packages}\n")
    return env / "bin" / "python"


def test_the_client_imports_and_calls_a_server_without_torch(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        python = client_only_python(tmp_path)
        script = f"""
import importlib.util, sys, time
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("numpy") is None
start = time.perf_counter()
from raee.client import RaeeClient
seconds = time.perf_counter() - start
client = RaeeClient("127.0.0.1:{server.port}", timeout=30)
[p] = client.classify("sentiment", ["a great film"], neighbours=True)
client.close()
heavy = sorted(m for m in ("torch", "numpy", "transformers", "sqlalchemy", "qdrant_client") if m in sys.modules)
print(type(p).__name__, p.label, p.exit_layer, p.depth, len(p.neighbours), heavy, f"{{seconds:.3f}}")
"""
        out = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        kind, label, exit_layer, depth, *_rest, heavy, seconds = out.stdout.split()
        assert kind == Prediction.__name__ and label in ("negative", "positive") and int(depth) == 4
        assert 0 <= int(exit_layer) <= 4 and heavy == "[]"
        print(f"client import in a torch-free venv: {float(seconds) * 1000:.0f} ms")
    finally:
        server.stop()
