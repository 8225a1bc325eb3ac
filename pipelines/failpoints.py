"""Named points at which a crash test can have a job killed, so that it stops at a chosen moment rather than
by timing luck. Inert unless the environment variable CLIP_RAY_KILL_AT names a point.

`CLIP_RAY_KILL_AT=write.tar_done` kills at the first shard that reaches that point, `write.tar_done:3` only at
shard 3. The kill is SIGKILL to the whole session the process runs in (the job's driver, its local Ray
runtime and every worker), as an operator's `kill -9` or a lost machine would do: nothing is cleaned up. A
test therefore starts the job in a session of its own (`start_new_session=True`) on a local Ray. A worker's
output dies with the driver, so a point reached also appends a line to the file named by CLIP_RAY_KILL_RECORD,
when set, before the kill.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "CLIP_RAY_KILL_AT"
RECORD_ENV = "CLIP_RAY_KILL_RECORD"


def reach(point: str, shard_id: int | None = None) -> None:
    """Kill the session here if CLIP_RAY_KILL_AT names this point (and this shard, when it names one)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, shard = spec.partition(":")
    if name != point or (shard and shard_id != int(shard)):
        return
    message = f"[failpoint] {ENV}={spec}: killing the session at {point} (shard {shard_id})"
    print(message, flush=True)
    sys.stderr.flush()
    record = os.environ.get(RECORD_ENV)
    if record:
        with open(record, "a") as f:
            f.write(message + "\n")
            f.flush()
            os.fsync(f.fileno())
    os.killpg(os.getsid(0), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)  # a process outside the session leader's group
