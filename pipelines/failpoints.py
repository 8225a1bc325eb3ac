"""Named points at which a crash test can have a job killed, so that it stops at a chosen moment rather than
by timing luck. Inert unless the environment variable CLIP_RAY_KILL_AT names a point.

`CLIP_RAY_KILL_AT=write.tar_done` kills at the first shard that reaches that point, `write.tar_done:3` only at
shard 3. The kill is SIGKILL to the whole session the process runs in (the job's driver, its local Ray
runtime and every worker), as an operator's `kill -9` or a lost machine would do: nothing is cleaned up. A
test therefore starts the job in a session of its own (`start_new_session=True`) on a local Ray. A worker's
output dies with the driver, so a point reached also appends a line to the file named by CLIP_RAY_KILL_RECORD,
when set, before the kill.

A point can also pause instead, so that a test acts (adds a node, kills the node the task runs on) while a
chosen shard or step is in flight: `CLIP_RAY_PAUSE_AT=stage.shard_started:0,train.checkpoint_saved:4` (a
comma-separated list) with `CLIP_RAY_PAUSE_DIR` a folder the test can read. The first process to reach a listed
point writes `<point>[:<id>].reached` there (its pid and host) and waits until `<point>[:<id>].release`
appears, for at most CLIP_RAY_PAUSE_TIMEOUT_S (300 s); a retry reaching it again goes on at once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

ENV = "CLIP_RAY_KILL_AT"
RECORD_ENV = "CLIP_RAY_KILL_RECORD"
PAUSE_ENV = "CLIP_RAY_PAUSE_AT"
PAUSE_DIR_ENV = "CLIP_RAY_PAUSE_DIR"
PAUSE_TIMEOUT_ENV = "CLIP_RAY_PAUSE_TIMEOUT_S"


def reach(point: str, shard_id: int | None = None) -> None:
    """Kill the session here if CLIP_RAY_KILL_AT names this point (and this shard, when it names one); pause
    here if CLIP_RAY_PAUSE_AT does."""
    _pause(point, shard_id)
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


def pause_name(point: str, shard_id: int | None = None) -> str:
    return point if shard_id is None else f"{point}:{shard_id}"


def _pause(point: str, shard_id: int | None) -> None:
    listed = os.environ.get(PAUSE_ENV)
    folder = os.environ.get(PAUSE_DIR_ENV)
    if not listed or not folder:
        return
    for spec in listed.split(","):
        name, _, shard = spec.strip().partition(":")
        if name == point and (not shard or shard_id == int(shard)):
            break
    else:
        return
    stem = os.path.join(folder, pause_name(point, None if not shard else shard_id))
    try:
        fd = os.open(stem + ".reached", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # paused once already: a retry goes on
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "shard_id": shard_id}, f)
    print(f"[failpoint] {PAUSE_ENV}: paused at {point} (shard {shard_id}), pid {os.getpid()}", flush=True)
    deadline = time.monotonic() + float(os.environ.get(PAUSE_TIMEOUT_ENV, "300"))
    while not os.path.exists(stem + ".release") and time.monotonic() < deadline:
        time.sleep(0.1)


def wait_reached(folder: str | os.PathLike, point: str, shard_id: int | None = None, timeout_s: float = 300):
    """For tests: wait until a paused point is reached; returns what the paused process wrote (pid, host)."""
    path = os.path.join(folder, pause_name(point, shard_id) + ".reached")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise TimeoutError(f"no process reached {pause_name(point, shard_id)} within {timeout_s:.0f} s")


def release(folder: str | os.PathLike, point: str, shard_id: int | None = None) -> None:
    """For tests: let a paused point go on."""
    Path(folder, pause_name(point, shard_id) + ".release").touch()
