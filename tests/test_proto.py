"""The committed Python stubs are exactly what proto/raee/v1/raee.proto generates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["raee_pb2.py", "raee_pb2.pyi", "raee_pb2_grpc.py"]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(["bash", "admin/gen_proto.sh", str(tmp_path)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    for name in GENERATED:
        fresh = (tmp_path / "raee/protos/raee/v1" / name).read_text()
        committed = (ROOT / "raee/protos/raee/v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run admin/gen_proto.sh"
