"""The committed Python stubs are exactly what proto/raee/v1/raee.proto generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [f"raee/v1/{name}" for name in ("raee_pb2.py", "raee_pb2.pyi", "raee_pb2_grpc.py", "raee.desc")] + [
    f"inference/grpc_predict_v2_{name}" for name in ("pb2.py", "pb2.pyi", "pb2_grpc.py")]
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(["bash", "admin/gen_proto.sh", str(tmp_path)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh = (tmp_path / "raee_server/protos" / name).read_bytes()
        committed = (ROOT / "raee_server/protos" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run admin/gen_proto.sh"


@pytest.mark.skipif(not BUF.exists(), reason="buf is not installed: admin/buf.sh installs it (admin/test.sh runs it)")
@pytest.mark.parametrize(("change", "rule"), [
    (("uint32 exit_layer = 3;", "uint32 exit_layer = 30;"), "FIELD_NO_DELETE"),  # a renumbered field
    (("string label = 1;\n  repeated LabelScore", "string verdict = 1;\n  repeated LabelScore"), "FIELD_SAME_NAME"),
    (("rpc GetServerInfo(", "rpc ServerInfo("), "RPC_NO_DELETE"),
])
def test_buf_breaking_catches_an_incompatible_change(tmp_path: Path, change: tuple[str, str], rule: str) -> None:
    """The committed baseline is what `buf breaking` compares with: a breaking edit of the proto fails it."""
    import google.rpc
    import grpc_tools

    proto = tmp_path / "proto" / "raee" / "v1" / "raee.proto"
    proto.parent.mkdir(parents=True)
    text = (ROOT / "proto/raee/v1/raee.proto").read_text()
    assert change[0] in text
    proto.write_text(text.replace(change[0], change[1], 1))
    googleapis = Path(google.rpc.__path__[0]).parents[1]
    image = tmp_path / "image.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'proto'}", f"-I{googleapis}",
                    f"-I{Path(grpc_tools.__file__).parent / '_proto'}", "--include_imports", "-o", str(image),
                    str(proto)], check=True)
    broken = subprocess.run([str(BUF), "breaking", str(image), "--config", str(ROOT / "buf.yaml"), "--against",
                             str(ROOT / "proto/baseline.binpb"), "--path", "raee/v1/raee.proto", "--error-format",
                             "json"], capture_output=True, text=True)
    assert broken.returncode != 0 and rule in broken.stdout, broken.stdout + broken.stderr
