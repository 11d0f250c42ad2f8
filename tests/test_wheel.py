"""The wheel works outside the checkout: it is built from a copy of the sources, installed into fresh virtual
environments in a temporary folder (nothing importable from the source tree), and then

- carries one top-level package, `raee_server`, with every module and data file of the checkout;
- as the base install (the client), imports `raee_server.client` without torch, with only its declared
  dependencies installed for real (from the wheels admin/setup.sh downloads), and calls a real server;
- as the server install, starts `raee-server --help`, migrates a fresh SQLite database, and finds the task
  specs, the demo sample, the console's files and the proto descriptor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from raee_server.types import Prediction

from .grpc_harness import ServerThread
from .test_grpc import make_settings, tiny_engine_factory

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".tools" / "wheelhouse"


def run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built without build isolation (offline) from a copy holding only what the build reads."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("raee_server", "migrations"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", out,
         source], cwd=out)
    [built] = out.glob("raee_serve-*.whl")
    return built


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment less what would let the checkout leak in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1", **extra}


def package_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_holds_one_top_level_package_with_every_file_of_the_checkout(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name.split("/")[0] for name in names} == {"raee_server", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["raee_server"]
    # every module and data file (task specs, demo sample, console, descriptor, py.typed), and migrations/ as
    # raee_server/migrations/
    wanted = {f"raee_server/{name}" for name in package_files(ROOT / "raee_server")}
    wanted |= {f"raee_server/migrations/{name}" for name in package_files(ROOT / "migrations")}
    assert wanted - names == set()
    assert {"raee_server/migrations/versions/0004_task_objective_and_prior_correction.py",
            "raee_server/serving/console/index.html", "raee_server/protos/raee/v1/raee.desc"} <= names


def test_the_client_install_calls_a_server_without_torch(wheel: Path, tmp_path: Path) -> None:
    if not any(WHEELHOUSE.glob("grpcio-*.whl")):
        pytest.fail(f"no client dependency wheels in {WHEELHOUSE}: run admin/setup.sh")
    env_dir = tmp_path / "client-venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # the wheel's declared dependencies, resolved by pip from the wheelhouse alone: nothing else is there
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", WHEELHOUSE, wheel], cwd=tmp_path,
        env=clean_env())
    settings = make_settings(tmp_path / "server")
    server = ServerThread(settings, tiny_engine_factory(tmp_path / "server", settings))
    server.wait_ready()
    try:
        script = f"""
import importlib.util, sys
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("numpy") is None
import raee_server
assert raee_server.__file__.startswith({str(env_dir)!r}), raee_server.__file__
from raee_server.client import RaeeClient
client = RaeeClient("127.0.0.1:{server.port}", timeout=30)
[p] = client.classify("sentiment", ["a great film"], neighbours=True)
client.close()
heavy = sorted(m for m in ("torch", "numpy", "transformers", "sqlalchemy", "qdrant_client") if m in sys.modules)
print(type(p).__name__, p.label, p.exit_layer, p.depth, heavy)
"""
        out = run([python, "-c", script], cwd=tmp_path, env=clean_env())
        kind, label, exit_layer, depth, heavy = out.split()
        assert kind == Prediction.__name__ and label in ("negative", "positive") and int(depth) == 4
        assert 0 <= int(exit_layer) <= 4 and heavy == "[]"
    finally:
        server.stop()


def test_the_server_install_starts_migrates_and_finds_its_files(wheel: Path, tmp_path: Path) -> None:
    """Installed with --no-deps into a fresh environment that sees this one's third-party packages (a .pth line:
    the .pth files there, this checkout's editable finder among them, are not run), so the server stack is
    there without a second multi-GB install, and `raee_server` can come only from the wheel."""
    env_dir = tmp_path / "server-venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    [site] = list((env_dir / "lib").glob("python*/site-packages"))
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python, bin_dir = env_dir / "bin" / "python", env_dir / "bin"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", wheel], cwd=tmp_path,
        env=clean_env())
    env = clean_env(RAEE_DATA_DIR=str(tmp_path / "data"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    assert "--address" in run([bin_dir / "raee-server", "--help"], cwd=tmp_path, env=env)
    migrated = run([bin_dir / "raee-admin", "migrate"], cwd=tmp_path, env=env)
    assert f"sqlite:///{tmp_path / 'data' / 'metadata.sqlite'}: schema empty -> 0006" in migrated
    document = json.loads(run([bin_dir / "raee-admin", "openapi"], cwd=tmp_path, env=env))
    classify = document["paths"]["/v1/tasks/{task}:classify"]["post"]
    assert classify["description"]  # the proto's comments, read from the shipped descriptor

    script = f"""
import raee_server, raee_server.migrations
from raee_server.cli import assets
from raee_server.core.datafile import read_rows
from raee_server.serving.gateway import console_dir
for module in (raee_server, raee_server.migrations):
    assert module.__file__.startswith({str(site)!r}), module.__file__
specs = [assets.task_spec(name) for name in assets.task_spec_names()]
rows = list(read_rows(assets.demo_sample(), "text", "label"))
console = sorted(p.name for p in console_dir().iterdir())
print(",".join(s.name for s in specs if s), len(rows), " ".join(console))
"""
    tasks_and_files = run([python, "-c", script], cwd=tmp_path, env=env).split()
    assert tasks_and_files[0].split(",") == ["agnews", "agnews-pairs", "qnli", "rte", "sst2", "trec", "trec-pairs"]
    assert int(tasks_and_files[1]) == 400
    assert {"index.html", "console.js", "console.css"} <= set(tasks_and_files[2:])
