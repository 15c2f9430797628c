"""Access: who may use the control socket, who may open a vhost-user socket, and names
that would put a socket outside its directory.

Unprivileged users are real ones (``setpriv`` to nobody, or to ``daemon``), against a
real daemon; every refusal must leave the database byte for byte as it was.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
import time

import pytest

from tests.control_client import raw_exchange
from tests.daemon_proc import DaemonProcess
from tests.switch_proc import ROOT

pytestmark = pytest.mark.timeout(180)

GROUP = "pyswitchtest"
NOGROUP = grp.getgrnam("nogroup").gr_gid
NOBODY = pwd.getpwnam("nobody").pw_uid


def as_user(user: str, argv: list[str], env: dict, groups: str | None = None,
            group: str = "nogroup") -> subprocess.CompletedProcess:
    """Run ``argv`` as ``user`` and ``group``, with only ``groups`` as supplementary ones."""
    prefix = ["setpriv", f"--reuid={user}", f"--regid={group}"]
    prefix += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return subprocess.run(prefix + argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60, check=False)


def cli_as(d: DaemonProcess, user: str, *args: str, groups: str | None = None) -> subprocess.CompletedProcess:
    return as_user(user, [sys.executable, "-m", "pyswitch", *args], d.env, groups)


def start_daemon(tmp_path, rundir, *extra: str) -> DaemonProcess:
    """A daemon in a run directory others can traverse (``open_rundir``), with options."""
    d = DaemonProcess(tmp_path, rundir=rundir)
    with open(d.log, "w") as logf:
        d.proc = subprocess.Popen([sys.executable, "-m", "pyswitch", "daemon", "--no-metrics", *extra],
                                  stdout=logf, stderr=subprocess.STDOUT, env=d.env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while "running:" not in d.log.read_text():
        assert d.proc.poll() is None and time.monotonic() < deadline, d.log.read_text()
        time.sleep(0.05)
    return d


def test_control_socket_0600_refuses_others_and_nothing_changes(tmp_path, open_rundir):
    d = start_daemon(tmp_path, open_rundir)
    try:
        d.cli("add-br", "br0")
        before = d.db.read_bytes()
        sock = open_rundir / "pyswitch.ctl"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and sock.stat().st_uid == 0
        r = cli_as(d, "nobody", "add-br", "evil")  # the file mode stops it at connect()
        assert r.returncode == 1 and "permission denied on" in r.stderr, r.stderr
        sock.chmod(0o666)  # a too-open file mode: the peer credential check still refuses
        r = cli_as(d, "nobody", "del-br", "br0")
        assert r.returncode == 1 and r.stderr.strip() == "pyswitch: permission denied", r.stderr
        assert d.db.read_bytes() == before and d.cli("list-br").stdout.split() == ["br0"]
        assert d.log.read_text().count("refused a client without permission") == 1
    finally:
        d.stop()


def test_control_group_lets_members_in_and_keeps_others_out(tmp_path, open_rundir):
    subprocess.run(["groupadd", "-f", GROUP], check=True)
    d = start_daemon(tmp_path, open_rundir, "--control-group", GROUP)
    try:
        sock = open_rundir / "pyswitch.ctl"
        st = sock.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(GROUP).gr_gid
        r = cli_as(d, "nobody", "add-br", "br0", groups=GROUP)  # a member: may change things
        assert r.returncode == 0, r.stderr
        before = d.db.read_bytes()
        r = cli_as(d, "nobody", "add-br", "evil")  # not a member
        assert r.returncode == 1 and "permission denied" in r.stderr, r.stderr
        sock.chmod(0o666)  # past the file mode, the group is still checked on the peer
        r = cli_as(d, "nobody", "add-br", "evil")
        assert r.returncode == 1 and r.stderr.strip() == "pyswitch: permission denied", r.stderr
        assert d.db.read_bytes() == before and d.cli("list-br").stdout.split() == ["br0"]
    finally:
        d.stop()


CONNECT = "import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')"


def test_vhost_user_socket_gets_the_configured_owner_group_and_mode(daemon, open_rundir):
    d = daemon.start()
    socks = open_rundir / "vhost"
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "vhu1", "--type", "dpdkvhostuser", "-o", f"vhost-sock-dir={socks}",
          "-o", "vhost-sock-owner=nobody", "-o", "vhost-sock-group=nogroup", "-o", "vhost-sock-mode=0660")
    d.cli("add-port", "br0", "vhu2", "--type", "dpdkvhostuser", "-o", f"vhost-sock-dir={socks}")
    socks.chmod(0o755)
    st = (socks / "vhu1").stat()
    assert stat.S_ISSOCK(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOGROUP, 0o660)
    # the owner may connect (a QEMU running as that user) ...
    r = as_user("nobody", [sys.executable, "-c", CONNECT, str(socks / "vhu1")], d.env)
    assert r.stdout.strip() == "connected", r.stderr
    # ... another unprivileged user may not; nor anyone but root on a socket left at the default
    r = as_user("daemon", [sys.executable, "-c", CONNECT, str(socks / "vhu1")], d.env, group="daemon")
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    assert (socks / "vhu2").stat().st_uid == 0
    r = as_user("nobody", [sys.executable, "-c", CONNECT, str(socks / "vhu2")], d.env)
    assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr


ESCAPES = [  # (port name, what the error says)
    ("../x", "may not contain"), ("..", "may not contain"), ("a/b", "may not contain"),
    ("/tmp/x", "may not contain"), ("a\\b", "may not contain"), ("v" * 65, "longer than 64"),
    ("a\x00b", "may not contain"), ("a\nb", "may not contain"), ("", "needs a port name"),
]


def test_names_that_would_escape_the_socket_directory_are_refused(daemon, tmp_path):
    d = daemon.start()
    socks = tmp_path / "deep" / "socks"
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "ok", "--type", "dpdkvhostuser", "-o", f"vhost-sock-dir={socks}")
    before, files = d.db.read_bytes(), sorted(p.name for p in tmp_path.rglob("*"))
    ctl = d.rundir / "pyswitch.ctl"
    for name, message in ESCAPES:
        for kind in ("dpdkvhostuser", "memory"):
            params = {"bridge": "br0", "port": name, "settings": {"type": kind, "options:vhost-sock-dir": str(socks)}
                      if kind == "dpdkvhostuser" else {"type": kind}}
            request = json.dumps({"id": 1, "method": "add-port", "params": params}) + "\n"
            reply = raw_exchange(ctl, request.encode())[0]
            assert message in reply.get("error", {}).get("message", ""), (name, kind, reply)
    # a name that is fine but whose socket path would not fit a unix socket address
    long_dir = tmp_path / ("d" * 90)
    r = d.cli("add-port", "br0", "vhu-long-name", "--type", "dpdkvhostuser", "-o", f"vhost-sock-dir={long_dir}",
              check=False)
    assert r.returncode == 2 and "too long for a unix socket" in r.stderr, r.stderr
    assert not long_dir.exists()
    # and the CLI says the same for an escape, as one line
    r = d.cli("add-port", "br0", "../../etc/evil", "--type", "dpdkvhostuser", check=False)
    assert r.returncode == 2 and "may not contain" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert d.db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == files  # nothing created anywhere
    assert not os.path.exists("/etc/evil") and not (socks.parent / "x").exists()
