"""Worker confinement (server/sandbox.py), tried for real in a child process: what the kernel
enforces once `confine` has run. Each layer is asserted where this kernel has it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradprobe.server.sandbox import landlock_abi

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ATTEMPTS = r"""
import json, os, socket, subprocess, sys, threading
from pathlib import Path
import torch
from gradprobe.server.sandbox import confine, readable_paths
scratch, outside, store = map(Path, sys.argv[1:4])
held = confine(scratch, readable_paths(never=store))
results = {"held": held}
def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = f"refused {exc.errno}"
attempt("write_scratch", lambda: (scratch / "a.bin").write_bytes(b"x"))
attempt("write_outside", lambda: (outside / "dropped.pth").write_bytes(b"x"))
attempt("read_store", lambda: (store / "victim.model").read_bytes())
attempt("read_etc", lambda: Path("/etc/passwd").read_bytes())
attempt("read_torch", lambda: Path(torch.__file__).read_bytes())
attempt("exec", lambda: subprocess.run(["/bin/true"], check=True))
attempt("fork", lambda: os.waitpid(os.fork(), 0) if True else None)
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", 9), timeout=1))
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
thread = threading.Thread(target=lambda: results.__setitem__("thread", "ran"))
thread.start(); thread.join()
results["torch"] = float((torch.ones(64, 64) @ torch.ones(64, 64)).sum())
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def confined(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("sandbox")
    folders = [root / name for name in ("scratch", "outside", "store")]
    for folder in folders:
        folder.mkdir()
    (folders[2] / "victim.model").write_bytes(b"secret weights")
    script = root / "attempts.py"
    script.write_text(ATTEMPTS)
    done = subprocess.run([sys.executable, str(script), *map(str, folders)],
                          capture_output=True, text=True, timeout=240, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), folders[1]


@pytest.mark.slow
def test_the_worker_keeps_computing(confined):
    results, _ = confined
    assert results["write_scratch"] == "allowed"
    assert results["read_torch"] == "allowed"
    assert results["thread"] == "ran" and results["torch"] == 64 * 64 * 64


@pytest.mark.slow
@pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock")
def test_landlock_confines_files(confined):
    results, outside = confined
    assert f"landlock-abi-{landlock_abi()}" in results["held"]
    assert results["write_outside"].startswith("refused")
    assert not (outside / "dropped.pth").exists()
    assert results["read_store"].startswith("refused")
    assert results["read_etc"].startswith("refused")
    assert results["exec"].startswith("refused")


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the seccomp filter is x86_64's")
def test_seccomp_refuses_processes_and_network(confined):
    results, _ = confined
    assert "seccomp" in results["held"] and "no_new_privs" in results["held"]
    for name in ("exec", "fork", "tcp", "udp"):
        assert results[name] == "refused 1", (name, results[name])  # EPERM


def test_a_server_worker_runs_confined():
    from server_harness import shared_server

    server = shared_server()
    about = server.pool.about
    assert "no_new_privs" in about.confinement
    if landlock_abi():
        assert f"landlock-abi-{landlock_abi()}" in about.confinement
    if platform.machine() == "x86_64":
        assert "seccomp" in about.confinement
        for pid in server.pool.pids:
            status = Path(f"/proc/{pid}/status").read_text()
            assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status


LIFELINE_ONLY = r"""
import multiprocessing, os, sys, time

def child(lifeline, parent_pid):
    from gradprobe.server.worker_limits import die_with_parent
    sys.platform = "not-linux"  # no PR_SET_PDEATHSIG: the pipe alone must do it
    die_with_parent(parent_pid, lifeline)
    time.sleep(600)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    lifeline, keep = ctx.Pipe(duplex=False)
    process = ctx.Process(target=child, args=(lifeline, os.getpid()))
    process.start()
    lifeline.close()
    print(process.pid, flush=True)
    time.sleep(600)
"""


def test_the_lifeline_pipe_alone_ends_a_worker_whose_server_was_killed(tmp_path: Path):
    from server_harness import wait_dead

    script = tmp_path / "parent.py"
    script.write_text(LIFELINE_ONLY)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(3.0)  # the child is past die_with_parent
        assert "zombie" not in Path(f"/proc/{child}/status").read_text()  # it runs
        parent.kill()  # kill -9
        parent.wait()
        wait_dead(child, timeout_s=10)
    finally:
        if parent.poll() is None:
            parent.kill()


DROP = r"""
import os, sys
from gradprobe.server.sandbox import drop_privileges
drop_privileges("nobody")
try:
    open(os.path.join(sys.argv[1], "as_root_owned.txt"), "w")
    print(os.getuid(), "wrote")
except PermissionError:
    print(os.getuid(), "refused")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_workers_can_switch_to_an_unprivileged_user(tmp_path: Path):
    import pwd

    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user 'nobody'")
    private = tmp_path / "root-only"
    private.mkdir(mode=0o700)
    done = subprocess.run([sys.executable, "-c", DROP, str(private)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(nobody), "refused"]
