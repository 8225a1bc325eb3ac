"""The local stack's process supervision, on plain shell processes instead of services: a spawned service is
logged and recorded, stopping it ends every process of its session, and a record whose pid now belongs to
someone else is left alone."""

import json
import os
import subprocess
import time

from infra.local import processes, state


def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    proc = processes.process_table().get(pid)
    return proc is not None and not proc.zombie


def test_a_spawned_service_is_logged_recorded_and_stopped_with_every_process_of_its_session(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(processes, "STOP_GRACE_S", 1.0)  # the shell's child outlives the leader's SIGTERM
    command = ["sh", "-c", "sleep 300 & echo up; wait"]
    pid = processes.spawn(tmp_path, "sleeper", command, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    log = state.log_path(tmp_path, "sleeper")
    _wait_for(lambda: "up" in log.read_text().splitlines())
    assert log.read_text().splitlines()[1].endswith(" sh -c 'sleep 300 & echo up; wait'")

    record = processes.read_record(tmp_path, "sleeper")
    assert record == json.loads(state.record_path(tmp_path, "sleeper").read_text())
    assert record["pid"] == pid and record["command"] == command
    assert processes.leader_alive(record)
    _wait_for(lambda: len(processes.session_processes(record, processes.process_table())) == 2)
    members = processes.session_processes(record, processes.process_table())

    assert processes.kill(tmp_path, "sleeper") == members
    assert [p for p in members if _alive(p)] == []
    assert not processes.leader_alive(record)
    assert processes.read_record(tmp_path, "sleeper") is None
    assert processes.kill(tmp_path, "sleeper") == []  # nothing recorded: nothing to do


def test_stopping_a_stale_record_leaves_alone_the_process_that_now_has_its_pid(tmp_path):
    pid = processes.spawn(tmp_path, "sleeper", ["sleep", "300"], env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    record = processes.read_record(tmp_path, "sleeper")
    stale = record | {"start": "a start time of some earlier process"}
    try:
        assert not processes.leader_alive(stale)
        assert processes.session_processes(stale, processes.process_table()) == []
        state.record_path(tmp_path, "sleeper").write_text(json.dumps(stale))
        assert processes.kill(tmp_path, "sleeper") == []
        assert _alive(pid)
        assert processes.read_record(tmp_path, "sleeper") is None
    finally:
        state.record_path(tmp_path, "sleeper").write_text(json.dumps(record))
        processes.kill(tmp_path, "sleeper")
    assert not _alive(pid)


def test_pid_alive_tells_a_running_process_from_one_that_exited():
    exited = subprocess.Popen(["true"])
    exited.wait()
    assert processes.pid_alive(os.getpid()) and not processes.pid_alive(exited.pid)
