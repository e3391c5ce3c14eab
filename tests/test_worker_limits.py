"""How much of the machine a server's workers may take: a container's cgroup limits (a pod's
CPU and memory limits), not the node's cores and memory."""

from __future__ import annotations

import pytest

from gradprobe.server.worker_limits import _cgroup_value


@pytest.fixture()
def cgroup(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/pod1/ctr\n")
    folder = tmp_path / "fs" / "kubepods" / "pod1" / "ctr"
    folder.mkdir(parents=True)

    def read(name: str, content: str) -> float | None:
        (folder / name).write_text(content)
        return _cgroup_value(name, fs_root=str(tmp_path / "fs"), membership=str(membership))

    return read


def test_a_cpu_quota_is_read_as_cpus(cgroup):
    assert cgroup("cpu.max", "250000 100000\n") == 2.5
    assert cgroup("cpu.max", "max 100000\n") is None


def test_a_memory_limit_is_read_in_bytes(cgroup):
    assert cgroup("memory.max", "8589934592\n") == 8 << 30
    assert cgroup("memory.max", "max\n") is None


def test_no_cgroup_v2_membership_means_no_limit(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("4:memory:/docker/abc\n")
    assert _cgroup_value("cpu.max", fs_root=str(tmp_path), membership=str(membership)) is None
    assert _cgroup_value("cpu.max", fs_root=str(tmp_path),
                         membership=str(tmp_path / "missing")) is None
