"""Open vSwitch as a peer: with DPDK for vhost-user (bench/vhost.py --ovs, bench/run.py), and
its userspace datapath without DPDK for veth ports (bench/run.py).

Contract of `OvsDpdk(stack, workdir)`:
- `start(ports, flows)` reserves 1024 x 2 MiB hugepages (mounting hugetlbfs on
  /dev/hugepages if nothing is mounted there), starts its own ovsdb-server and
  ovs-vswitchd-dpdk (PMD on CPU 1, other DPDK threads on CPU 0) as child processes with
  every file under `workdir`, adds a `datapath_type=netdev` bridge with `dpdkvhostuser`
  ports (sockets `workdir/<port>`) and the given ovs-ofctl flows, and returns the socket
  paths once they exist. RuntimeError (with the log tail) if any step fails.
- `pause()` / `resume()`: SIGSTOP / SIGCONT ovs-vswitchd, so its PMD thread, which spins
  on a whole CPU while running, does not compete with the other back ends' measurements.
- Undo, registered on `stack` before each step: the processes are continued, terminated
  (killed after 10 s), the TAP interfaces it made (the bridge's, `ovs-netdev`) deleted, DPDK's runtime directory (own --file-prefix) removed, hugetlbfs unmounted if it was mounted here and `nr_hugepages` set
  back to its previous value (0 on these machines). Never leave OVS running.
- `OvsDpdk(stack, workdir, dpdk=False, cpu=N)`: the same private instance without DPDK
  (the plain ovs-vswitchd of openvswitch-switch, pinned to CPU N with taskset): no
  hugepages; `start(bridge, ports, flows, port_type=None)` adds existing kernel interfaces
  (veth ends) to a `datapath_type=netdev` bridge: OVS's userspace datapath on AF_PACKET
  sockets, no kernel module. Returns [] (no sockets).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from common import run, spawn, stop_process

VSWITCHD = "/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk"
VSWITCHD_PLAIN = "/usr/lib/openvswitch-switch/ovs-vswitchd"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
HUGE_MOUNT = Path("/dev/hugepages")
PAGES = 1024


class OvsDpdk:
    """One private OVS-DPDK instance; see the module docstring."""

    def __init__(self, stack: ExitStack, workdir: Path, dpdk: bool = True,
                 cpu: int | None = None) -> None:
        self.stack, self.dir, self.dpdk, self.cpu = stack, workdir, dpdk, cpu
        self.program = VSWITCHD if dpdk else VSWITCHD_PLAIN
        self.db = f"unix:{workdir}/db.sock"
        self.env = {**os.environ, "OVS_RUNDIR": str(workdir), "OVS_LOGDIR": str(workdir),
                    "OVS_DBDIR": str(workdir)}
        self.vswitchd: subprocess.Popen | None = None
        self.prefix = "pst" + secrets.token_hex(4)  # DPDK --file-prefix: own runtime dir

    def start(self, bridge: str, ports: list[str], flows: list[str],
              port_type: str | None = "dpdkvhostuser") -> list[Path]:
        if not Path(self.program).exists():
            package = "openvswitch-switch-dpdk" if self.dpdk else "openvswitch-switch"
            raise RuntimeError(f"{self.program} missing: install {package}")
        if self.dpdk:
            self._hugepages()
        self._ovsdb()
        # the netdev bridge's internal port is a TAP that outlives ovs-vswitchd: delete it
        # after vswitchd has stopped (callbacks run in reverse order)
        self.stack.callback(run, "ip", "link", "del", bridge, check=False)
        if not Path("/sys/class/net/ovs-netdev").exists():  # the netdev datapath's own TAP
            self.stack.callback(run, "ip", "link", "del", "ovs-netdev", check=False)
        self._vswitchd()
        self.vsctl("add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev")
        for port in ports:
            typed = ("--", "set", "Interface", port, f"type={port_type}") if port_type else ()
            self.vsctl("add-port", bridge, port, *typed)
        for flow in flows:
            run("ovs-ofctl", "add-flow", f"unix:{self.dir}/{bridge}.mgmt", flow)
        if port_type is None:
            return []
        socks = [self.dir / port for port in ports]
        self._wait(lambda: all(s.exists() for s in socks), "vhost-user sockets")
        return socks

    def vsctl(self, *args: str) -> str:
        return run("ovs-vsctl", f"--db={self.db}", "--timeout=30", *args, timeout=40)

    def pause(self) -> None:
        if self.vswitchd is not None:
            self.vswitchd.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.vswitchd is not None:
            self.vswitchd.send_signal(signal.SIGCONT)

    def _hugepages(self) -> None:
        before = HUGEPAGES.read_text().strip()
        self.stack.callback(HUGEPAGES.write_text, before + "\n")
        HUGEPAGES.write_text(f"{PAGES}\n")
        got = int(HUGEPAGES.read_text())
        if got < PAGES // 2:
            raise RuntimeError(f"only {got} hugepages could be reserved")
        mounts = Path("/proc/mounts").read_text().splitlines()
        if not any(line.split()[1] == str(HUGE_MOUNT) for line in mounts):
            HUGE_MOUNT.mkdir(exist_ok=True)
            run("mount", "-t", "hugetlbfs", "none", str(HUGE_MOUNT))
            self.stack.callback(run, "umount", str(HUGE_MOUNT), check=False)

    def _ovsdb(self) -> None:
        conf = self.dir / "conf.db"
        run("ovsdb-tool", "create", str(conf), SCHEMA)
        log = self.stack.enter_context(open(self.dir / "ovsdb.log", "w"))  # noqa: SIM115
        spawn(self.stack, ["ovsdb-server", str(conf), f"--remote=punix:{self.dir}/db.sock",
                           f"--pidfile={self.dir}/ovsdb.pid"],
              stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self._wait(lambda: (self.dir / "db.sock").exists(), "ovsdb-server socket")
        self.vsctl("--no-wait", "init")
        if not self.dpdk:
            return
        self.vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
                   f"other_config:dpdk-extra=--no-pci --file-prefix={self.prefix}",
                   "other_config:dpdk-socket-mem=1024",
                   "other_config:pmd-cpu-mask=0x2", "other_config:dpdk-lcore-mask=0x1")

    def _vswitchd(self) -> None:
        log = self.stack.enter_context(open(self.dir / "vswitchd.log", "w"))  # noqa: SIM115
        self.stack.callback(shutil.rmtree, Path("/var/run/dpdk") / self.prefix, ignore_errors=True)
        argv = [self.program, self.db, f"--pidfile={self.dir}/vswitchd.pid"]
        if self.cpu is not None:
            argv = ["taskset", "-c", str(self.cpu), *argv]
        self.vswitchd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env)
        proc = self.vswitchd
        self.stack.callback(stop_process, proc)
        self.stack.callback(self.resume)  # a stopped process must run to act on SIGTERM
        if self.dpdk:
            self._wait(lambda: "dpdk|INFO|DPDK Enabled" in self._log("vswitchd.log")
                       or proc.poll() is not None, "DPDK initialisation", 60)
        else:  # ovs-vsctl without --no-wait then waits for vswitchd to apply each change
            self._wait(lambda: (self.dir / "vswitchd.pid").exists()
                       or proc.poll() is not None, "pidfile", 30)
        if proc.poll() is not None:
            raise RuntimeError(f"ovs-vswitchd exited:\n{self._log('vswitchd.log')[-3000:]}")

    def _log(self, name: str) -> str:
        return (self.dir / name).read_text(errors="replace")

    def _wait(self, cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                log = self.dir / "vswitchd.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"OVS: no {what} after {timeout} s:\n{tail}")
            time.sleep(0.1)
