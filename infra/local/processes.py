"""Supervision of the stack's services: each starts detached in a session of its own (setsid) with its log
and a pid file, so stopping it finds every process it spawned, including ones re-parented to init, without
touching anyone else's (unlike `ray stop`): its leader gets a grace period, then the rest are killed."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.local.state import StackError, log_path, record_path

STOP_GRACE_S = 15.0


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    zombie: bool
    start: str


def process_table() -> dict[int, Proc]:
    table = {}
    if Path("/proc/self/stat").exists():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces and parentheses; the fields after its last ')' do not.
            fields = stat[stat.rfind(")") + 2 :].split()
            pid = int(entry)
            table[pid] = Proc(pid, int(fields[1]), int(fields[3]), fields[0] == "Z", fields[19])
        return table
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "lstart="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        pid, ppid, stat, *start = line.split()
        with contextlib.suppress(OSError):
            table[int(pid)] = Proc(int(pid), int(ppid), os.getsid(int(pid)), "Z" in stat, " ".join(start))
    return table


def session_processes(record: dict, table: dict[int, Proc]) -> list[int]:
    """Live processes of a recorded service: its session, plus descendants that made sessions of their own."""
    sid = record["pid"]
    leader = table.get(sid)
    if leader is not None and leader.start != record["start"] and leader.sid == sid:
        return []  # the pid now leads somebody else's session: the record is stale
    members = {p.pid for p in table.values() if p.sid == sid and not p.zombie}
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    frontier = list(members)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in members and not table[child].zombie:
                members.add(child)
                frontier.append(child)
    members.discard(os.getpid())
    return sorted(members)


def read_record(state_dir: Path, service: str) -> dict | None:
    path = record_path(state_dir, service)
    return json.loads(path.read_text()) if path.exists() else None


def leader_alive(record: dict | None) -> bool:
    if record is None:
        return False
    proc = process_table().get(record["pid"])
    return proc is not None and not proc.zombie and proc.start == record["start"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def spawn(state_dir: Path, service: str, command: list[str], env: dict[str, str], cwd: Path) -> int:
    log = log_path(state_dir, service)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    record = {"pid": proc.pid, "start": process_table()[proc.pid].start, "command": command}
    path = record_path(state_dir, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return proc.pid


def kill(state_dir: Path, service: str) -> list[int]:
    """Ask the service's leader to shut down, then SIGTERM and finally SIGKILL whatever is left; returns the
    pids it found.

    The leader goes first because it shuts its children down in order (`ray start --block` drains the
    node in ~2 s), whereas a SIGTERM to all of Ray's processes at once leaves some hanging for long.
    """
    record = read_record(state_dir, service)
    if record is None:
        return []
    pids = killed = session_processes(record, process_table())
    leader = [record["pid"]] if record["pid"] in pids else pids
    for targets, sig, wait_s in (
        (leader, signal.SIGTERM, STOP_GRACE_S),
        (None, signal.SIGTERM, 3.0),
        (None, signal.SIGKILL, 5.0),
    ):
        if not pids:
            break
        for pid in targets or pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            # Recomputed each time: processes forked meanwhile belong to the session too.
            pids = session_processes(record, process_table())
    for pid in killed:  # reap those that were our own children, so no zombie lingers
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    if pids:
        raise StackError(f"{service}: processes {pids} survived SIGKILL")
    record_path(state_dir, service).unlink(missing_ok=True)
    return killed
