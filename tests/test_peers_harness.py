"""The real-peer harness (tests/peers) against a vhost-user back end known to work: net_vhost.

Two QEMU guests sit on two net_vhost ports of one dpdk-testpmd in `io` mode (port 0 <-> port 1: a
wire between the VMs) and ping each other, once with QEMU connecting (testpmd listens, the
`dpdkvhostuser` role) and once with QEMU listening (testpmd connects with client=1, the
`dpdkvhostuserclient` role). When these pass, a failure of the same tests against pyswitch is
pyswitch's. Boot-to-first-reply times are printed (run with -s) and recorded as test properties.

CPU: testpmd's forwarding lcore spins on CPU 1 once started; the TCG guests (-smp 1) share the rest.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.peers.initramfs import NET_MODULES, build_initramfs, find_kernel, module_load_order
from tests.peers.missing import PeerMissingError
from tests.peers.qemu import Guest, GuestError, ping_pair, start_guest
from tests.peers.testpmd import Testpmd

pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]

GUEST_TIMEOUT = 100  # seconds of wall time a guest may live, whatever happens to the test
MACS = ("02:50:53:00:00:01", "02:50:53:00:00:02")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory (socket paths must stay under 108 bytes); always removed."""
    path = Path(tempfile.mkdtemp(prefix="pst"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_pings(
    guests: tuple[Guest, Guest], record_property: pytest.RecordProperty, label: str
) -> None:
    """Both guests got all their replies; record and print launch-to-ready and
    launch-to-first-reply."""
    for guest in guests:
        result = guest.ping_result(timeout=90)
        assert result.ok and "received=5/5" in result.line, guest.describe()
        assert result.first_reply_s is not None and result.ready_s <= result.first_reply_s
        record_property(f"{label}-{guest.name}-ready-s", round(result.ready_s, 2))
        record_property(f"{label}-{guest.name}-first-reply-s", round(result.first_reply_s, 2))
        print(
            f"\n{label} {guest.name}: launch->READY {result.ready_s:.1f}s, launch->first reply "
            f"{result.first_reply_s:.1f}s (guest uptime {result.first_reply_uptime}s)"
        )


def _check_forwarded(testpmd: Testpmd) -> None:
    """testpmd saw the pings both ways: each port received at least the 5 requests or replies, and
    in io mode what one port received went out of the other."""
    stats = testpmd.port_stats()
    assert stats[0].rx_packets >= 5 and stats[1].rx_packets >= 5, stats
    assert (
        stats[1].tx_packets <= stats[0].rx_packets and stats[0].tx_packets <= stats[1].rx_packets
    ), stats


def test_two_guests_ping_through_testpmd_vhost_qemu_client(
    workdir: Path, record_property: pytest.RecordProperty
) -> None:
    """QEMU connects (chardev client); net_vhost listens, as pyswitch's dpdkvhostuser will."""
    socks = (workdir / "vh0.sock", workdir / "vh1.sock")
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    with Testpmd(vdevs, forward_mode="io", cleanup_paths=socks) as testpmd:
        assert all(s.exists() for s in socks), testpmd.output()
        testpmd.command("start")
        with ping_pair(workdir, socks, role="client", timeout=GUEST_TIMEOUT) as (g0, g1):
            _check_pings((g0, g1), record_property, "qemu-client")
            _check_forwarded(testpmd)
        runtime = testpmd.runtime_dirs()
    assert not g0.running and not g1.running
    assert not any(s.exists() for s in socks) and not any(r.exists() for r in runtime)


def test_two_guests_ping_through_testpmd_vhost_qemu_server(
    workdir: Path, record_property: pytest.RecordProperty
) -> None:
    """QEMU listens (server=on,wait=off); testpmd's net_vhost connects with client=1, as pyswitch's
    dpdkvhostuserclient will.  The guests boot before any back end is there."""
    socks = (workdir / "q0.sock", workdir / "q1.sock")
    with ping_pair(workdir, socks, role="server", timeout=GUEST_TIMEOUT) as (g0, g1):
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in socks):
            assert time.monotonic() < deadline, "QEMU did not create its vhost-user sockets"
            time.sleep(0.05)
        vdevs = [f"net_vhost{i},iface={s},queues=1,client=1" for i, s in enumerate(socks)]
        with Testpmd(vdevs, forward_mode="io") as testpmd:
            testpmd.command("start")
            _check_pings((g0, g1), record_property, "qemu-server")
            _check_forwarded(testpmd)
    assert not any(s.exists() for s in socks), (
        "Guest.stop() must remove the socket QEMU listened on"
    )


def test_ping_result_reports_failure_when_nobody_answers(workdir: Path) -> None:
    """A guest whose peer port has no guest: the ping action ends in PYSWITCH-PING-FAIL within its
    `seconds` bound, so a test against a broken switch fails quickly instead of hanging."""
    socks = (workdir / "f0.sock", workdir / "f1.sock")
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    with Testpmd(vdevs, cleanup_paths=socks) as testpmd:
        testpmd.command("start")
        with start_guest(
            "pst-f0",
            socks[0],
            "02:50:53:00:00:0f",
            "10.250.0.1/24",
            "10.250.0.2",
            workdir=workdir,
            seconds=4,
            timeout=GUEST_TIMEOUT,
        ) as guest:
            result = guest.ping_result(timeout=90)
            assert not result.ok and result.first_reply_s is None, result
            assert "no reply from 10.250.0.2 in 4s" in result.line
            assert guest.wait_exit(timeout=30) == 0  # /init powered the guest off
        assert testpmd.port_stats()[0].rx_packets >= 3  # its ARP requests reached the back end


def test_client_guest_without_back_end_fails_clearly(workdir: Path) -> None:
    """No back end listening: start_guest raises GuestError naming the socket; no QEMU runs."""
    sock = workdir / "nobody.sock"
    with pytest.raises(GuestError, match="no vhost-user back end listening on .*nobody.sock"):
        start_guest("pst-none", sock, MACS[0], "10.0.0.1/24", workdir=workdir, connect_timeout=0.5)
    assert not (workdir / "pst-none.qemu.log").exists()


def test_missing_peers_fail_naming_the_package(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an empty PATH the harness fails (never skips), naming the Debian package to install."""
    monkeypatch.setenv("PATH", str(workdir))
    with pytest.raises(PeerMissingError, match="install the Debian package qemu-system-x86"):
        start_guest("pst-x", workdir / "x.sock", MACS[0], "10.0.0.1/24", workdir=workdir)
    with pytest.raises(PeerMissingError, match="install the Debian package dpdk-dev"):
        Testpmd(["net_vhost0,iface=/nonexistent"])


def test_initramfs_is_cached_and_loads_virtio_net_after_its_dependencies(workdir: Path) -> None:
    """The archive is a valid newc cpio (read back by busybox cpio), holds /init, busybox and every
    module modules.dep requires, dependencies first; a second build reuses the cached file."""
    first = build_initramfs(cache_dir=workdir)
    mtime = first.stat().st_mtime_ns
    assert build_initramfs(cache_dir=workdir) == first and first.stat().st_mtime_ns == mtime
    listing = subprocess.run(
        f"gunzip -c {first} | busybox cpio -t",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    unpacked = workdir / "unpacked"
    unpacked.mkdir()
    subprocess.run(
        f"gunzip -c {first} | busybox cpio -id modules/order",
        shell=True,
        cwd=unpacked,
        capture_output=True,
        check=True,
        timeout=30,
    )
    order = (unpacked / "modules" / "order").read_text().split()
    assert {"init", "bin/busybox", "dev/console", "modules/order"} <= set(listing)
    assert {f"modules/{name}.ko" for name in order} <= set(listing)
    kernel = find_kernel()
    assert len(order) == len(module_load_order(kernel.moddir, NET_MODULES))
    # Every module comes after all the modules modules.dep says it needs.
    for line in (kernel.moddir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = Path(path).name.split(".ko")[0]
        if name in order:
            needed = {Path(d).name.split(".ko")[0] for d in deps.split()}
            assert needed <= set(order[: order.index(name)]), (name, needed, order)
    assert {"virtio_net", "virtio_pci", "8021q"} <= set(order)


def test_testpmd_port_stats_parse_live_counters(workdir: Path) -> None:
    """A testpmd with two idle net_vhost ports reports both ports at zero; stopping it removes its
    runtime directory and the sockets it made."""
    socks = (workdir / "s0.sock", workdir / "s1.sock")
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    with Testpmd(vdevs, cleanup_paths=socks) as testpmd:
        stats = testpmd.port_stats()
        runtime = [r for r in testpmd.runtime_dirs() if r.exists()]
        assert runtime, "testpmd's runtime directory should exist while it runs"
    assert sorted(stats) == [0, 1]
    assert all(s.rx_packets == 0 and s.tx_packets == 0 and s.rx_errors == 0 for s in stats.values())
    assert not any(r.exists() for r in runtime) and not any(s.exists() for s in socks)


def test_vlan_guests_ping_over_tagged_frames(workdir: Path) -> None:
    """Guests given vlan=10 talk through eth0.10 (8021q is in the initramfs); testpmd's io mode
    passes tagged frames as they are and, verbose, shows their EtherType is 802.1Q."""
    socks = (workdir / "v0.sock", workdir / "v1.sock")
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    with Testpmd(vdevs, cleanup_paths=socks) as testpmd, ExitStack() as stack:
        testpmd.command("set verbose 1")
        testpmd.command("start")
        pinger = stack.enter_context(
            start_guest(
                "pst-v0",
                socks[0],
                MACS[0],
                "10.250.10.1/24",
                "10.250.10.2",
                workdir=workdir,
                vlan=10,
                count=3,
                timeout=GUEST_TIMEOUT,
            )
        )
        server = stack.enter_context(
            start_guest(
                "pst-v1",
                socks[1],
                MACS[1],
                "10.250.10.2/24",
                workdir=workdir,
                vlan=10,
                action="serve",
                seconds=80,
                timeout=GUEST_TIMEOUT,
            )
        )
        assert "dev=eth0.10" in server.wait_for("PYSWITCH-READY", timeout=60)
        assert "PYSWITCH-PING-OK received=3/3" in pinger.wait_for("PYSWITCH-PING-", timeout=90), (
            pinger.describe()
        )
        # testpmd's verbose dump of a received burst: "src=.. - dst=.. - pool=.. - type=0x8100 -
        # ..."
        assert "type=0x8100" in testpmd.output() and "type=0x0800" not in testpmd.output()
        assert (
            testpmd.port_stats()[0].rx_packets >= 4
        )  # an ARP request and 3 echo requests at least


# Shell run by a guest (action "cmd"): ping its peer forever, one console line per reply.
PONG_LOOP = (
    "n=0; while true; do if ping -c 1 -W 1 {peer} >/dev/null; then n=$((n+1)); "
    "echo PYSWITCH-PONG $n; sleep 0.5; fi; done"
)


def test_qemu_client_reconnects_after_back_end_restart(
    workdir: Path, record_property: pytest.RecordProperty
) -> None:
    """The back end goes away and comes back on the same sockets (a switch restart): QEMU's chardev
    reconnect=1 brings the guests' NICs back without a reboot and the pings resume."""
    socks = (workdir / "r0.sock", workdir / "r1.sock")
    vdevs = [f"net_vhost{i},iface={s},queues=1" for i, s in enumerate(socks)]
    first = Testpmd(vdevs, cleanup_paths=socks)
    with ExitStack() as stack:
        stack.callback(first.stop)
        first.start()
        first.command("start")
        pinger = stack.enter_context(
            start_guest(
                "pst-r0",
                socks[0],
                MACS[0],
                "10.250.0.1/24",
                workdir=workdir,
                action="cmd",
                script=PONG_LOOP.format(peer="10.250.0.2"),
                timeout=GUEST_TIMEOUT,
            )
        )
        stack.enter_context(
            start_guest(
                "pst-r1",
                socks[1],
                MACS[1],
                "10.250.0.2/24",
                workdir=workdir,
                action="serve",
                seconds=90,
                timeout=GUEST_TIMEOUT,
            )
        )
        pinger.wait_for("PYSWITCH-PONG", timeout=60)
        first.stop()
        assert not any(s.exists() for s in socks)
        down = time.monotonic()
        time.sleep(1.0)
        with Testpmd(vdevs, cleanup_paths=socks) as second:
            second.command("start")
            line = pinger.wait_for("PYSWITCH-PONG", timeout=40, after=time.monotonic())
            back = time.monotonic() - down
            assert second.port_stats()[0].rx_packets >= 1
        assert pinger.running, "the guest must survive the back end's restart"
    record_property("reconnect-first-reply-s", round(back, 2))
    print(f"\nback end down -> first reply after restart: {back:.1f}s ({line})")
