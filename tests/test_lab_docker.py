"""``ftpalg.lab.docker`` without running anything: the cgroup file systems dockerd's namespace
mounts again (as the host has them: cgroup v1 here, cgroup2 only on a current systemd host),
and the start script made of them."""

from __future__ import annotations

from pathlib import Path

from ftpalg.lab import docker

V1 = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2 = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0
"""


def test_cgroup_v1_hierarchies_as_the_host_has_them():
    tmpfs, mounts = docker.cgroup_mounts(V1)
    assert tmpfs
    assert mounts == [("cgroup", "cpu", "cpu"), ("cgroup", "memory", "memory"),
                      ("cgroup", "systemd", "name=systemd"), ("cgroup2", "unified", "")]


def test_cgroup2_only_is_mounted_at_the_top():
    tmpfs, mounts = docker.cgroup_mounts(V2)
    assert not tmpfs and mounts == [("cgroup2", "", "nsdelegate,memory_recursiveprot")]
    script = docker.start_script(Path("/x"), ["dockerd"], (tmpfs, mounts))
    assert "mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup\n" in script
    assert "tmpfs -o mode=755 cgroup_root" not in script


def test_no_cgroups_seen_gives_the_v1_set():
    tmpfs, mounts = docker.cgroup_mounts("proc /proc proc rw 0 0\n")
    assert tmpfs and mounts == list(docker.DEFAULT_CGROUPS)


def test_start_script_mounts_then_execs():
    script = docker.start_script(Path("/x"), ["dockerd"], docker.cgroup_mounts(V1))
    lines = script.splitlines()
    assert lines[:4] == ["set -e", "mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup",
                         "mkdir -p /sys/fs/cgroup/cpu", "mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu"]
    # /run is a tmpfs of its own, the host's entries bound back but docker's and containerd's
    assert "mount --rbind /run /x/hostrun" in lines and "mount -t tmpfs -o mode=755 run /run" in lines
    assert lines.index("mount --rbind /run /x/hostrun") < lines.index("mount -t tmpfs -o mode=755 run /run")
    assert any("docker|containerd" in line for line in lines) and lines[-1] == 'exec "$@"'
