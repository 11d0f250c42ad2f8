"""The server's background exit-head fit, in a child process at the lowest CPU priority.

A fit is minutes of dense linear algebra. In the server's own process it shares torch's thread
pool and the cores with the model worker, and request latency doubled while it ran
(docs/results.md, "Growing a task online"). In a child at nice 19 the OS scheduler gives the
worker the cores first and the fit takes what is left. The child needs only the SQL store: it
reads the records' exit features, fits, and stores a new heads version, which the engine picks
up at its next check. The SQL URL travels in the environment, not argv, so `ps` never shows a
password.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

URL_VARIABLE = "RAEE_FIT_SQL_URL"
KEYS_VARIABLE = "RAEE_FIT_KEYS"  # a file of the task's keys (auto.save_keys): the key head's features


async def fit_heads_in_child(sql_url: str, task: str, niceness: int = 19, keys: Path | None = None,
                             full: bool = False, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit and store the task's heads in a low-priority child; its summary. With `keys` (the parent's
    `auto.save_keys` file: the child cannot open the embedded vector store), the key head too.
    The child's progress lines reach `progress` as they come. Cancelling the awaiting task kills
    the child (a shutdown never waits for a fit)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "raee_server.serving.fitter", task, str(niceness), *(["--full"] if full else []),
        env={**os.environ, URL_VARIABLE: sql_url, **({KEYS_VARIABLE: str(keys)} if keys else {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        errors = asyncio.create_task(child.stderr.read())  # type: ignore[union-attr]
        last = b""
        async for line in child.stdout:  # type: ignore[union-attr]
            message = json.loads(line) if line.startswith(b"{") else {}
            if "progress" in message and progress is not None:
                progress(str(message["progress"]))
            last = line
        err = await errors
        await child.wait()
    except asyncio.CancelledError:
        child.kill()
        await child.wait()
        raise
    if child.returncode != 0:
        raise RuntimeError(f"exit-head fit of {task!r} failed (exit {child.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    summary: dict[str, Any] = json.loads(last)
    return summary


def _die_with_parent() -> None:
    """Linux: end this fit when its server dies (SIGKILL included). A replica's lease lapses when it
    dies and another replica fits the task; an orphaned fit would race it to store the next version."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def main() -> int:
    _die_with_parent()
    os.nice(int(sys.argv[2]) if len(sys.argv) > 2 else 19)  # the model worker first; the fit takes the idle CPU
    from raee_server.core.auto import fit_and_store_heads, load_keys
    from raee_server.stores.metadata import MetadataStore

    keys = os.environ.get(KEYS_VARIABLE)
    heads = fit_and_store_heads(MetadataStore(os.environ[URL_VARIABLE]), sys.argv[1],
                                lambda m: print(json.dumps({"progress": m}), flush=True),
                                full="--full" in sys.argv[3:], keys=load_keys(Path(keys)) if keys else None)
    print(json.dumps(heads.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
