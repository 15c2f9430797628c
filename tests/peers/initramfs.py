"""A tiny busybox initramfs that boots the host's distribution kernel into a one-shot network guest.

API
- `find_kernel() -> KernelInfo`: the newest `/boot/vmlinuz-<ver>` that has `/lib/modules/<ver>`;
  raises `PeerMissingError` naming linux-image-amd64 when there is none.
- `build_initramfs(cache_dir=None, kernel=None, extra_modules=()) -> Path`: a gzip'd cpio (newc)
  archive holding static busybox, the virtio-net and 8021q modules of that kernel (plus
  `extra_modules`) in dependency order, and `/init`. Cached in `cache_dir` (default
  `$PYSWITCH_PEER_CACHE` or /tmp/pyswitch-peer-cache) under a name derived from the kernel version
  and the archive's inputs, so tests build it once; written atomically, so parallel test runs may
  share the cache.
- `boot_image(kernel, cache_dir=None) -> Path`: what QEMU's -kernel gets: the kernel's ELF vmlinux
  (extracted once, cached) when it can boot through PVH, which halves boot time under TCG; else the
  bzImage.
- `guest_cmdline(ip, peer_ip, action=..., ...) -> str`: the kernel command line that configures
  `/init`.

What /init does (parameters come from `pst.*` words on the kernel command line):
  mount /proc /sys /dev; insmod the modules listed in /modules/order; bring eth0 up (or the VLAN
  device eth0.<pst.vlan>) with address `pst.ip` (CIDR); print `PYSWITCH-READY uptime=<s>`; run the
  action; print `PYSWITCH-POWEROFF`; `poweroff -f`.
  Actions (`pst.action`):
  - `ping`: ping `pst.peer` once a second until the first reply or `pst.time` seconds (prints
    `PYSWITCH-FIRST-REPLY uptime=<s>`), then `pst.count` pings at 0.2 s intervals; prints
    `PYSWITCH-PING-OK received=<n>/<n>` when every one was answered, else `PYSWITCH-PING-FAIL ...`.
  - `serve`: stay up `pst.time` seconds (the kernel answers pings), then `PYSWITCH-DONE`.
  - `cmd`: run the base64-encoded shell script `pst.cmd`; prints `PYSWITCH-CMD-EXIT rc=<rc>`.
  After the action the guest stays up `pst.linger` seconds (default 0: a peer guest may still be
  pinging it). Errors print `PYSWITCH-ERROR <what>`. All markers are whole lines on the serial
  console.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from tests.peers.missing import PeerMissingError, require_path

KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX = Path("/bin/busybox")
# Modules a virtio-net-pci guest needs (8021q for VLANs); their dependencies come from modules.dep.
NET_MODULES = ("virtio_pci", "virtio_net", "8021q")
DEFAULT_CACHE = Path(os.environ.get("PYSWITCH_PEER_CACHE", "/tmp/pyswitch-peer-cache"))

INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "PYSWITCH-$*"; }
finish() { say POWEROFF; sync; poweroff -f; sleep 5; }
P_count=5; P_time=60; P_action=ping
for w in $(cat /proc/cmdline); do
  case "$w" in pst.*=*) k=${w%%=*}; k=${k#pst.}; eval "P_$k=\${w#*=}";; esac
done
for m in $(cat /modules/order); do insmod /modules/$m.ko || say ERROR insmod $m; done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -e /sys/class/net/eth0 ] || { say ERROR no eth0; finish; }
ip link set lo up; ip link set eth0 up
dev=eth0
if [ -n "$P_vlan" ]; then
  ip link add link eth0 name eth0.$P_vlan type vlan id $P_vlan || say ERROR vlan
  ip link set eth0.$P_vlan up; dev=eth0.$P_vlan
fi
[ -n "$P_mtu" ] && ip link set $dev mtu $P_mtu
ip addr add $P_ip dev $dev || say ERROR address $P_ip
say READY uptime=$(up) dev=$dev ip=$P_ip
case "$P_action" in
ping)
  end=$(( $(cut -d. -f1 /proc/uptime) + P_time )); got=0
  while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do
    if ping -c 1 -W 1 $P_peer >/dev/null 2>&1; then got=1; break; fi
  done
  if [ $got = 1 ]; then
    say FIRST-REPLY uptime=$(up)
    r=$(ping -c $P_count -i 0.2 -W 2 $P_peer | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    verdict=PING-FAIL; [ "$r" = "$P_count" ] && verdict=PING-OK
    say $verdict received=$r/$P_count
  else
    say PING-FAIL no reply from $P_peer in ${P_time}s
  fi;;
serve) sleep $P_time; say DONE;;
cmd) echo "$P_cmd" | base64 -d > /tmp/cmd.sh; sh /tmp/cmd.sh; say CMD-EXIT rc=$?;;
*) say ERROR unknown action $P_action;;
esac
[ -n "$P_linger" ] && sleep $P_linger
finish
"""

_S_IFDIR, _S_IFREG, _S_IFCHR = 0o040000, 0o100000, 0o020000


@dataclass(frozen=True)
class KernelInfo:
    """A bootable kernel image and the module tree of the same version."""

    version: str
    vmlinuz: Path
    moddir: Path


def find_kernel() -> KernelInfo:
    """Return the newest kernel in /boot whose modules are installed; `PeerMissingError` if none."""
    candidates = []
    for image in sorted(Path("/boot").glob("vmlinuz-*")):
        version = image.name[len("vmlinuz-") :]
        moddir = Path("/lib/modules") / version
        if (moddir / "modules.dep").exists() and os.access(image, os.R_OK):
            candidates.append(KernelInfo(version, image, moddir))
    if not candidates:
        raise PeerMissingError(
            "no /boot/vmlinuz-* with its /lib/modules tree: "
            f"install the Debian package {KERNEL_PACKAGE}"
        )
    return max(candidates, key=lambda k: _version_key(k.version))


def _version_key(version: str) -> list[int]:
    """Sort key for kernel versions such as 6.1.0-56-amd64 (numeric parts only)."""
    return [int(p) for p in version.replace("-", ".").split(".") if p.isdigit()]


def module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Paths (relative to `moddir`) of `wanted` modules and their dependencies, dependencies first.

    Modules built into the kernel (modules.builtin) are left out; one that is neither is an error.
    """
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(p): p for p in deps}
    builtin_file = moddir / "modules.builtin"
    builtin = (
        {_module_name(p) for p in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise PeerMissingError(
                f"kernel module {name} not in {moddir}: install {KERNEL_PACKAGE}"
            )
    return [Path(p) for p in order]


def _module_name(path: str) -> str:
    """kernel/drivers/net/virtio_net.ko.xz -> virtio_net (names use '_', files may use '-')."""
    return Path(path).name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """The uncompressed bytes of a .ko, .ko.xz, .ko.gz or .ko.zst (busybox insmod wants a .ko)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise PeerMissingError(f"{path} is zstd-compressed: install the Debian package zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    return data


class CpioWriter:
    """Writes a cpio archive in the "newc" format the kernel unpacks
    (Documentation/driver-api/early-userspace)."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            2 if mode & _S_IFDIR else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        self._out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, _S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, _S_IFREG | perm, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, _S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the whole archive."""
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def build_initramfs(
    cache_dir: Path | None = None,
    kernel: KernelInfo | None = None,
    extra_modules: tuple[str, ...] = (),
) -> Path:
    """The path of the cached initramfs for `kernel` (default: `find_kernel()`); built if needed.

    Raises `PeerMissingError` when busybox, the kernel or a module is missing.
    """
    require_path(BUSYBOX, BUSYBOX_PACKAGE, "static busybox")
    kernel = kernel or find_kernel()
    modules = module_load_order(kernel.moddir, NET_MODULES + tuple(extra_modules))
    busybox = BUSYBOX.read_bytes()
    digest = hashlib.sha256(INIT_SCRIPT.encode() + busybox + repr(modules).encode()).hexdigest()[
        :12
    ]
    cache = cache_dir or DEFAULT_CACHE
    target = cache / f"initramfs-{kernel.version}-{digest}.cpio.gz"
    if target.exists():
        return target
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "modules"):
        cpio.directory(d)
    cpio.char_device(
        "dev/console", 5, 1
    )  # the kernel opens it for /init's stdio before mounting devtmpfs
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    names = [_module_name(str(m)) for m in modules]
    for name, rel in zip(names, modules, strict=True):
        cpio.file(f"modules/{name}.ko", read_module(kernel.moddir / rel))
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())
    _write_atomically(target, gzip.compress(cpio.finish(), compresslevel=6))
    return target


def boot_image(kernel: KernelInfo, cache_dir: Path | None = None) -> Path:
    """The image to give QEMU's -kernel: the ELF vmlinux inside the bzImage when the kernel can boot
    it via PVH (CONFIG_PVH=y), else the bzImage itself.  Under TCG, decompressing the kernel in the
    guest costs about as long as booting it (5 s against 11 s to power-off alone); the ELF is
    extracted once and cached."""
    config = kernel.vmlinuz.parent / f"config-{kernel.version}"
    if not config.exists() or "CONFIG_PVH=y" not in config.read_text().splitlines():
        return kernel.vmlinuz
    target = (cache_dir or DEFAULT_CACHE) / f"vmlinux-{kernel.version}"
    if target.exists():
        return target
    data = kernel.vmlinuz.read_bytes()
    elf = _decompress_payload(data)
    if elf is None:
        return kernel.vmlinuz
    _write_atomically(target, elf)
    return target


def _decompress_payload(bzimage: bytes) -> bytes | None:
    """The ELF kernel compressed inside a bzImage (xz or gzip payload), or None if not found."""
    for magic, decompress in ((b"\xfd7zXZ\x00", _unxz), (b"\x1f\x8b\x08", _gunzip)):
        at = bzimage.find(magic)
        if at < 0:
            continue
        try:
            elf = decompress(bzimage[at:])
        except (lzma.LZMAError, OSError, EOFError):
            continue
        if elf.startswith(b"\x7fELF"):
            return elf
    return None


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)  # ignores trailing bytes


def _gunzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data)  # ignores trailing bytes


def _write_atomically(target: Path, data: bytes) -> None:
    """Write `target` via a temporary file and a rename: no reader ever sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(data)
    os.replace(tmp.name, target)


def guest_cmdline(
    ip: str,
    peer_ip: str = "",
    action: str = "ping",
    count: int = 5,
    seconds: int = 60,
    vlan: int | None = None,
    script: str | None = None,
    linger: int = 0,
    extra: str = "",
) -> str:
    """A guest's kernel command line: serial console, quiet, no reboot on panic, /init's `pst.*`.

    `ip` is CIDR ("10.9.0.1/24"); `seconds` bounds the ping wait (`ping`) or the up time (`serve`);
    `script` is the shell text run by action `cmd` (base64-encoded so spaces survive the command
    line).
    """
    words = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        f"pst.ip={ip}",
        f"pst.action={action}",
        f"pst.count={count}",
        f"pst.time={seconds}",
        f"pst.linger={linger}",
    ]
    if peer_ip:
        words.append(f"pst.peer={peer_ip}")
    if vlan is not None:
        words.append(f"pst.vlan={vlan}")
    if script is not None:
        words.append("pst.cmd=" + base64.b64encode(script.encode()).decode())
    if extra:
        words.append(extra)
    return " ".join(words)
