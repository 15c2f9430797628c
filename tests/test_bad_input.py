"""Bad input everywhere but the data path: control requests, YAML files, CLI arguments.

Each gets a clear error (exit status 2 or an error reply with status 2), changes nothing
(the database file byte for byte, ``show`` equal) and never disturbs forwarding: two
namespaces ping each other through the daemon the whole time, and no ping may be lost.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.control_client import Pinger, raw_exchange, two_veth_hosts
from tests.switch_proc import ROOT

pytestmark = pytest.mark.timeout(300)


def _req(method, params=None, rid=1) -> bytes:
    body = {"id": rid, "method": method}
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode() + b"\n"


BAD_REQUESTS = [
    (b"hello\n", "request is not JSON"),
    (b"\xff\xfe\n", "request is not JSON"),
    (b"[1, 2]\n", "needs a method and params object"),
    (b'"add-br"\n', "needs a method and params object"),
    (b"null\n", "needs a method and params object"),
    (b'{"method": 5, "params": {}}\n', "needs a method and params object"),
    (b'{"method": "add-br", "params": ["br9"]}\n', "needs a method and params object"),
    (b"[" * 200_000 + b"\n", "nested too deeply"),
    (_req("frobnicate", {}), "unknown command 'frobnicate'"),
    (_req("add-port", {"bridge": ["br0"], "port": "m9"}), "add-port: malformed parameters"),
    (_req("add-port", {"bridge": "br0", "port": "m9", "settings": "type=memory"}),
     "add-port: malformed parameters"),
    (_req("add-port", {"bridge": "br0", "port": "a\u0000b", "settings": {"type": "memory"}}), "may not contain"),
    (_req("add-port", {"bridge": "br0", "port": "../m9", "settings": {"type": "memory"}}), "may not contain"),
    (_req("add-port", {"bridge": "br0", "port": "m" * 65, "settings": {"type": "memory"}}),
     "longer than 64 characters"),
    (_req("set-port", {"port": "m1", "settings": {"tag": [5]}}), "must be an integer"),
    (_req("set-port", {"port": "m1", "settings": {"tag": "nine"}}), "must be an integer"),
    (_req("transaction", {"commands": "add-br br9"}), "commands must be a list"),
    (_req("transaction", {"commands": [["add-br", {"bridge": "br9"}], [5, {}]]}), "unknown command 5"),
    (_req("apply", {}), "params.config must be the configuration"),
    (_req("apply", {"config": "bridges: {}"}), "params.config must be the configuration"),
    (_req("apply", {"config": {"bridges": [1]}}), "bridges must be a mapping"),
    (_req("add-flow", {"bridge": "br0", "flow": "priority=abc actions=drop"}), "not a number"),
    (_req("port-stats", {"port": 5}), "no port named 5"),
]


@pytest.fixture
def busy(daemon, prefix):
    """A daemon with traffic flowing between two namespaces, and its state before."""
    d = daemon.start()
    two_veth_hosts(d, prefix, "10.96.0")
    d.cli("add-port", "br0", "m1", "--type", "memory", "tag=5")
    pinger = Pinger(f"{prefix}1", "10.96.0.2", count=100_000, interval=0.02)
    before = (d.db.read_bytes(), d.cli("show", "--json").stdout)
    try:
        yield d, before
        assert pinger.proc.poll() is None, pinger.proc.communicate()[0]
    finally:
        pinger.proc.send_signal(2)  # SIGINT: ping prints its summary
        lost, _ = pinger.result(timeout=30)
    assert lost <= 1, pinger.out  # the echo in flight when SIGINT stopped ping has no reply yet
    assert (d.db.read_bytes(), d.cli("show", "--json").stdout) == before  # nothing changed


def test_malformed_control_requests_get_a_clear_error(busy):
    d, _ = busy
    for data, message in BAD_REQUESTS:
        replies = raw_exchange(d.rundir / "pyswitch.ctl", data)
        assert len(replies) == 1 and message in replies[0]["error"]["message"], (data[:80], replies)
        assert replies[0]["error"]["status"] == 2, (data[:80], replies)
    assert d.proc.poll() is None


def test_a_pipeline_of_good_and_bad_requests_is_answered_in_order(busy):
    d, _ = busy
    data = b"".join([_req("list-br", {}, 1), b"nonsense\n", _req("list-ports", {"bridge": "br0"}, 3),
                     _req("list-ports", {"bridge": "nope"}, 4)])
    replies = raw_exchange(d.rundir / "pyswitch.ctl", data, lines=4)
    assert [r.get("id") for r in replies] == [1, None, 3, 4]
    assert replies[0]["result"] == ["br0"] and "not JSON" in replies[1]["error"]["message"]
    assert "m1" in replies[2]["result"] and replies[3]["error"]["message"] == "no bridge named nope"


def test_a_request_over_the_limit_is_refused_and_the_connection_closed(busy):
    d, _ = busy
    huge = b'{"method": "add-br", "params": {"bridge": "' + b"x" * (1 << 20) + b'"}}\n'
    replies = raw_exchange(d.rundir / "pyswitch.ctl", huge, lines=2)
    assert len(replies) == 1 and "request too large" in replies[0]["error"]["message"], replies


def test_half_a_request_then_a_disconnect_changes_nothing(busy):
    d, _ = busy
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(d.rundir / "pyswitch.ctl"))
            s.sendall(_req("add-br", {"bridge": "half"})[:-5])  # no end of line
    assert d.cli("list-br").stdout.split() == ["br0"]
    assert "half" not in d.db.read_text()


BAD_YAML = {
    "not-yaml": ("bridges: [\n", "not valid YAML"),
    "tab": ("bridges:\n\tbr0: {}\n", "not valid YAML"),
    "binary": ("\x00\x01\x02", "not valid YAML"),
    "duplicate": ("bridges: {}\nbridges: {}\n", "duplicate key"),
    "python-tag": ("bridges:\n  br0:\n    fail_mode: !!python/name:os.system ''\n", "not valid YAML"),
    "python-tag-ignored": ("bridges:\n  br0: !!python/object/apply:os.system ['true']\n",
                           "a bridge must be a mapping"),  # the tag is not obeyed: a plain list
    "deep": ("[" * 5_000, "nested too deeply"),
    "huge-int": ("bridges: {br0: {mac_table_size: " + "9" * 5000 + "}}\n", "not valid YAML"),
    "alias-bomb": ("bridges:\n  br0:\n    x0: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + "".join(f"    x{i}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                             for i, (p, c) in enumerate(zip("abcdefg", "bcdefgh"), 1)),
                   "expands to more than"),
    "wrong-shape": ("bridges:\n  br0:\n    ports: [a, b]\n", "must be a mapping"),
    "bad-value": ("bridges:\n  br0:\n    ports:\n      p: {type: memory, tag: 0}\n", "out of range"),
}


@pytest.mark.timeout(120)
def test_malformed_yaml_files_are_refused_by_apply_check_and_up(busy, tmp_path):
    """Each file: one line naming the file, status 2, nothing applied, within seconds
    (an alias bomb used to keep the CLI busy for a minute)."""
    d, _ = busy
    calls = []
    for name, (text, message) in BAD_YAML.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        for verb in ("apply", "check") if name in ("not-yaml", "alias-bomb", "deep") else ("apply",):
            calls.append((name, verb, path, message))
    with ThreadPoolExecutor(4) as pool:  # each call is a Python start: run a few at once
        results = list(pool.map(lambda c: d.cli(c[1], str(c[2]), check=False, timeout=30), calls))
    for (name, verb, path, message), r in zip(calls, results):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, (name, verb, r.returncode, r.stderr[-2000:])
        assert lines[0].startswith(f"pyswitch: {path}") and message in lines[0], (name, verb, lines)
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"bridges:\n  br\xe9: {}\n")
    r = d.cli("apply", str(not_utf8), check=False)
    assert r.returncode == 2 and "not UTF-8" in r.stderr
    # `pyswitch up` on a bad file stops at once with the same message
    r = subprocess.run([sys.executable, "-m", "pyswitch", "up", str(tmp_path / "tab.yaml"), "--no-metrics"],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=30,
                       env={**d.env, "PYSWITCH_RUNDIR": str(tmp_path / "up-run")})
    assert r.returncode != 0 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr, r.stderr


BAD_ARGS = [
    ("frobnicate",), ("--bogus", "list-br"), ("add-port",), ("add-port", "br0", "m9", "--type"),
    ("add-port", "br0", "m9", "--type", "memory", "-o", "novalue"), ("set-port", "m1", "tag"),
    ("set-port", "m1", "tag=-1"), ("add-br", "x" * 100), ("add-br", "a/b"), ("add-port", "br0", "a b"),
    ("set", "Port"), ("list-ports",), ("add-flow", "br0", "priority=abc,actions=drop"),
    ("del-flows", "br0", "in_port=nosuch"), ("dump-flows", "br0", "xyz=1"), ("apply", "/nonexistent"),
    ("set-bridge", "br0", "mac_aging_time=1e9"), ("add-port", "br0", "m9", "--type", "memory", "tag=x"),
]


def test_bad_cli_arguments_exit_2_with_an_error_and_change_nothing(busy):
    d, _ = busy
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda a: d.cli(*a, check=False), BAD_ARGS))
    for args, r in zip(BAD_ARGS, results):
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and (last.startswith("pyswitch: ") or ": error: " in last), \
            (args, r.stderr)
