"""The CLI end to end against a real daemon process: verbs, JSON, errors, persistence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.daemon_proc import DaemonProcess
from tests.switch_proc import ROOT, leftovers
from tests.test_e2e_namespaces import ping


def test_every_verb_and_its_json(daemon):
    d = daemon.start()
    d.cli("add-br", "br0")
    d.cli("add-br", "br1", "mac_aging_time=60", "mac_table_size=100")
    d.cli("add-port", "br0", "m1", "--type", "memory", "--option", "tag=10")
    d.cli("add-port", "br0", "m2", "--type=memory", "-o", "capacity=16", "-o", "trunks=10,20")
    d.cli("add-port", "br1", "m3", "--type", "memory", "tag=7")
    assert json.loads(d.cli("list-br", "--json").stdout) == ["br0", "br1"]
    assert d.cli("list-br").stdout.split() == ["br0", "br1"]
    assert d.cli("list-ports", "br0").stdout.split() == ["m1", "m2"]
    assert d.cli("br-exists", "br1").returncode == 0
    shown = json.loads(d.cli("show", "--json").stdout)
    br0 = shown["bridges"][0]
    assert br0["name"] == "br0" and [p["name"] for p in br0["ports"]] == ["m1", "m2"]
    assert br0["ports"][1]["trunks"] == [10, 20] and br0["ports"][1]["options"] == {"capacity": "16"}
    text = d.cli("show").stdout
    assert "Bridge br1" in text and "Port m1" in text and "tag: 10" in text and "type: memory" in text
    d.cli("set-port", "m1", "tag=20")
    d.cli("set", "Port", "m2", "trunks=[]")
    d.cli("set", "Bridge", "br1", "other_config:mac-aging-time=30")
    shown = json.loads(d.cli("--json", "show").stdout)
    assert shown["bridges"][0]["ports"][0]["tag"] == 20 and "trunks" not in shown["bridges"][0]["ports"][1]
    assert shown["bridges"][1]["mac_aging_time"] == 30
    stats = json.loads(d.cli("port-stats", "--json").stdout)
    assert set(stats) == {"m1", "m2", "m3"} and stats["m3"]["rx_packets"] == 0
    assert "port  1 (m1, memory, bridge br0)" in d.cli("port-stats", "br0").stdout
    assert json.loads(d.cli("fdb-show", "br0", "--json").stdout) == []
    assert d.cli("fdb-show", "br0").stdout.startswith(" port  VLAN  MAC                Age")
    assert d.cli("fdb-flush").returncode == 0
    d.cli("del-port", "m2")
    d.cli("del-port", "br1", "m3")
    d.cli("del-br", "br1")
    assert d.cli("list-br").stdout.split() == ["br0"]
    exported = yaml.safe_load(d.cli("export").stdout)
    assert exported == {"bridges": {"br0": {"ports": {"m1": {"type": "memory", "tag": 20, "ofport": 1}}}}}
    # the database holds the same, saved after the last change
    assert yaml.safe_load(d.db.read_text()) == exported


def test_errors_are_one_clear_line_with_ovs_exit_statuses(daemon):
    d = daemon.start()
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "m1", "--type", "memory")
    cases = [
        (("add-port", "nope", "m9", "--type", "memory"), 2, "no bridge named nope"),
        (("add-port", "br0", "m1", "--type", "memory"), 1, "port m1 already exists on bridge br0"),
        (("add-br", "br0"), 1, "bridge br0 already exists"),
        (("br-exists", "br7"), 2, "no bridge named br7"),
        (("set-port", "m1", "tag=5000"), 2, "bridges.br0.ports.m1.tag: 5000 is out of range (1..4095)"),
        (("add-port", "br0", "m2", "--type", "memory", "-o", "colour=red"), 2,
         "unknown option 'colour' for type memory"),
        (("add-port", "br0", "m2", "--type", "warp"), 2, "unknown port type 'warp'"),
        (("add-port", "br0", "zz-no-such-if"), 2, "no --type given and no interface named zz-no-such-if"),
        (("del-port", "m9"), 2, "no port named m9"),
        (("add-port", "br0", "../evil", "--type", "memory"), 2, "may not contain"),
        (("set", "Mirror", "x", "a=b"), 2, "set: unknown table 'Mirror'"),
        (("add-port", "br0", "m2", "--type", "memory", "--", "list-br"), 2, "cannot be chained"),
    ]
    for args, status, message in cases:
        r = d.cli(*args, check=False)
        assert r.returncode == status, (args, r.returncode, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
    assert d.cli("add-br", "br0", "--may-exist").returncode == 0
    assert d.cli("del-port", "m9", "--if-exists").returncode == 0
    assert d.cli("list-ports", "br0").stdout.split() == ["m1"]  # nothing changed


def test_daemon_not_running_says_how_to_start_it(tmp_path):
    env = {**os.environ, "PYSWITCH_RUNDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "pyswitch", "list-br"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=30)
    assert r.returncode == 1
    assert "pyswitch is not running" in r.stderr and "pyswitch daemon" in r.stderr


def test_short_form_add_port_vhostuser_uses_the_default_bridge(daemon):
    d = daemon.start()
    d.cli("add-port", "vhostuser0")  # exactly as written
    assert (d.rundir / "vhostuser0").is_socket()  # in the run directory, as OVS's vhost-sock-dir
    shown = json.loads(d.cli("show", "--json").stdout)
    assert shown["bridges"][0]["name"] == "br0"  # created because there was none
    assert shown["bridges"][0]["ports"][0]["type"] == "dpdkvhostuser"
    d.cli("add-port", "m1", "--type", "memory")  # the only bridge is used
    assert d.cli("list-ports", "br0").stdout.split() == ["m1", "vhostuser0"]


def test_ovs_vsctl_chain_is_one_transaction(daemon):
    d = daemon.start()
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "p1", "--", "set", "Interface", "p1", "type=memory", "options:capacity=8",
          "--", "set", "Port", "p1", "tag=42")
    port = json.loads(d.cli("show", "--json").stdout)["bridges"][0]["ports"][0]
    assert (port["type"], port["tag"], port["options"]) == ("memory", 42, {"capacity": "8"})
    # a chain whose last step is invalid changes nothing at all
    r = d.cli("add-port", "br0", "p2", "--type", "memory", "--", "set", "Port", "p2", "tag=0", check=False)
    assert r.returncode == 2 and "tag" in r.stderr
    assert d.cli("list-ports", "br0").stdout.split() == ["p1"]


def test_restart_restores_everything_and_traffic_flows_again(daemon, prefix):
    d = daemon.start()
    p = prefix
    d.cli("add-br", "br0", "mac_aging_time=77")
    for n in (1, 2):
        d.cli("add-port", "br0", f"{p}{n}", "--type", "veth", "tag=5", "-o", f"netns={p}{n}",
              "-o", f"peer-address=10.95.0.{n}/24")
    d.cli("add-port", "br0", "m1", "--type", "memory", "trunks=5,6")
    assert ping(f"{p}1", "10.95.0.2")
    before = json.loads(d.cli("export", "--json").stdout if False else "null") or d.cli("export").stdout
    d.stop()
    assert not leftovers(p)  # a clean stop removes what the ports created
    d.start()
    assert d.cli("export").stdout == before
    shown = json.loads(d.cli("show", "--json").stdout)["bridges"][0]
    assert shown["mac_aging_time"] == 77 and [x.get("tag") for x in shown["ports"]] == [5, 5, None]
    assert ping(f"{p}1", "10.95.0.2")
    # kill -9: the database is intact, and the next start restores it too, reclaiming the
    # veth pairs the killed process could not remove
    d.stop(signal.SIGKILL)
    assert f"{p}1" in leftovers(p)
    d.start()
    assert d.cli("export").stdout == before
    assert "error" not in d.cli("show", "--json").stdout
    assert ping(f"{p}1", "10.95.0.2")
    assert "removing the veth left by a pyswitch that did not stop cleanly" in d.log.read_text()


def test_corrupt_database_is_refused_and_left_untouched(daemon):
    d = daemon
    d.db.parent.mkdir(parents=True, exist_ok=True)
    for content in ("bridges: [\n", "bridges:\n  br0:\n    ports:\n      p: {type: memory, tag: 99999}\n",
                    "\xff\xfe not text"):
        d.db.write_bytes(content.encode("latin-1"))
        d.start(expect_running=False)
        assert d.proc.returncode == 1
        assert "database" in d.log.read_text().splitlines()[-1]
        assert d.db.read_bytes() == content.encode("latin-1")


def test_concurrent_cli_calls_all_apply(daemon):
    d = daemon.start()
    d.cli("add-br", "br0")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: d.cli("add-port", "br0", f"c{i}", "--type", "memory", check=False),
                                range(16)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    assert sorted(d.cli("list-ports", "br0").stdout.split()) == sorted(f"c{i}" for i in range(16))
    assert len(yaml.safe_load(d.db.read_text())["bridges"]["br0"]["ports"]) == 16


def test_apply_is_idempotent_and_round_trips_with_export(daemon, tmp_path):
    d = daemon.start()
    topo = tmp_path / "t.yaml"
    topo.write_text("bridges:\n  br0:\n    ports:\n      a: {type: memory, tag: 10}\n      b: {type: memory}\n"
                    "  br1:\n    mac_table_size: 10\n    ports:\n      c: {type: memory}\n")
    out = d.cli("apply", str(topo)).stdout
    assert "add bridge br0" in out and "add port a to br0" in out and "add port c to br1" in out
    assert d.cli("apply", str(topo)).stdout.strip() == "no changes: the switch already matches the file"
    exported = tmp_path / "exported.yaml"
    d.cli("export", "-o", str(exported))
    assert d.cli("apply", str(exported)).stdout.strip().startswith("no changes")
    # a changed file: only the differences are applied, each reported
    topo.write_text("bridges:\n  br0:\n    ports:\n      a: {type: memory, tag: 11}\n      d: {type: memory}\n")
    plan = d.cli("apply", "--dry-run", str(topo)).stdout.splitlines()
    assert sorted(plan) == sorted(["would delete port b from br0", "would delete port c from br1",
                                   "would delete bridge br1", "would add port d to br0 (type memory)",
                                   "would set port a VLAN {'tag': 11}"])
    assert d.cli("list-br").stdout.split() == ["br0", "br1"]  # dry run changed nothing
    d.cli("apply", str(topo))
    assert d.cli("list-br").stdout.split() == ["br0"]
    assert d.cli("list-ports", "br0").stdout.split() == ["a", "d"]


def test_invalid_or_failing_apply_leaves_the_switch_as_it_was(daemon, tmp_path, prefix):
    d = daemon.start()
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "m1", "--type", "memory")
    before = d.cli("export").stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("bridges:\n  br0:\n    ports:\n      m1: {type: memory, tag: nine}\n")
    r = d.cli("apply", str(bad), check=False)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"pyswitch: {bad}:4: bridges.br0.ports.m1.tag: must be an integer, not a string 'nine'"
    # valid, but the second new port cannot be created (its interface name is taken)
    subprocess.run(["ip", "link", "add", f"{prefix}x", "type", "veth", "peer", "name", f"{prefix}y"], check=True)
    try:
        bad.write_text(f"bridges:\n  br0:\n    ports:\n      m1: {{type: memory}}\n      m2: {{type: memory}}\n"
                       f"      {prefix}x: {{type: veth}}\n")
        r = d.cli("apply", str(bad), check=False)
        assert r.returncode == 1 and "nothing was changed" in r.stderr
    finally:
        subprocess.run(["ip", "link", "del", f"{prefix}x"], capture_output=True)
    assert d.cli("export").stdout == before
    assert d.cli("list-ports", "br0").stdout.split() == ["m1"]


def test_control_socket_refuses_unprivileged_users(tmp_path, open_rundir):
    d = DaemonProcess(tmp_path, rundir=open_rundir).start()
    try:
        sock = open_rundir / "pyswitch.ctl"
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        r = d.cli("list-br", check=False, user="nobody")  # the file mode stops it
        assert r.returncode == 1 and "permission denied on" in r.stderr, r.stderr
        sock.chmod(0o666)  # and if the file mode let it through, the peer check still refuses
        r = d.cli("list-br", check=False, user="nobody")
        assert r.returncode == 1 and r.stderr.strip() == "pyswitch: permission denied", r.stderr
        assert d.cli("list-br").returncode == 0  # root still gets in
        assert "refused a client without permission" in d.log.read_text()
    finally:
        d.stop()


def test_socket_group_grants_access(tmp_path, open_rundir):
    subprocess.run(["groupadd", "-f", "pyswitchtest"], check=True)
    d = DaemonProcess(tmp_path, rundir=open_rundir)
    d.proc = subprocess.Popen([sys.executable, "-m", "pyswitch", "daemon", "--control-group", "pyswitchtest",
                               "--no-metrics"],
                              stdout=open(d.log, "w"), stderr=subprocess.STDOUT, env=d.env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while "running:" not in d.log.read_text():
            assert d.proc.poll() is None and time.monotonic() < deadline, d.log.read_text()
            time.sleep(0.05)
        assert oct(os.stat(open_rundir / "pyswitch.ctl").st_mode & 0o777) == "0o660"
        argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=pyswitchtest",
                sys.executable, "-m", "pyswitch", "list-br"]
        r = subprocess.run(argv, capture_output=True, text=True, env=d.env, cwd=ROOT, timeout=30)
        assert r.returncode == 0, r.stderr
        r = d.cli("list-br", check=False, user="nobody")  # not in the group
        assert r.returncode == 1 and "permission denied" in r.stderr
    finally:
        d.stop()


def test_flows_survive_a_restart_and_go_with_their_port(daemon, tmp_path):
    d = daemon.start()
    d.cli("add-br", "br0")
    d.cli("add-port", "br0", "m1", "--type", "memory")
    d.cli("add-port", "br0", "m2", "--type", "memory")
    d.cli("add-flow", "br0", "priority=100,in_port=m1,udp,tp_dst=53 actions=drop")
    d.cli("add-flow", "br0", "priority=100,in_port=m1,udp,tp_dst=53 actions=output:m2")  # replaces
    rules = tmp_path / "rules.txt"
    rules.write_text("# comment\npriority=5,in_port=m2 actions=output:m1\n\npriority=6,arp actions=flood\n")
    d.cli("add-flows", "br0", str(rules))
    d.cli("mod-flows", "br0", "arp actions=normal")
    before = d.cli("dump-flows", "br0").stdout
    assert "priority=100,udp,in_port=m1,tp_dst=53 actions=output:m2" in before
    assert "priority=6,arp actions=NORMAL" in before and before.count("cookie=") == 4
    d.stop()
    d.start()
    after = d.cli("dump-flows", "br0").stdout
    assert [ln.split(", ", 6)[-1] for ln in after.splitlines()] == \
        [ln.split(", ", 6)[-1] for ln in before.splitlines()], (before, after)
    d.cli("del-port", "m2")  # rules naming m2 go with it
    left = d.cli("dump-flows", "br0").stdout
    assert "m2" not in left and left.count("cookie=") == 2
    d.cli("del-flows", "br0")
    assert d.cli("dump-flows", "br0").stdout.strip() == ""
    assert yaml.safe_load(d.db.read_text())["bridges"]["br0"]["flows"] == []


def test_port_numbers_in_rules_are_the_ports_ofports_and_survive_restarts(daemon):
    """A rule written with port numbers means the ports that have those numbers now (gaps
    left by deleted ports included), and each port keeps its number across a restart."""
    d = daemon.start()
    d.cli("add-br", "br0")
    for n in (1, 2, 3):
        d.cli("add-port", "br0", f"m{n}", "--type", "memory")
    d.cli("del-port", "m1")  # m2 stays 2, m3 stays 3: no renumbering
    d.cli("add-flow", "br0", "priority=9,in_port=3 actions=output:2")
    assert "priority=9,in_port=m3 actions=output:m2" in d.cli("dump-flows", "br0").stdout
    d.cli("add-port", "br0", "m4", "--type", "memory")  # the lowest free number: 1

    def ofports() -> dict[str, int]:
        shown = json.loads(d.cli("--json", "show").stdout)["bridges"][0]["ports"]
        return {p["name"]: p["ofport"] for p in shown}

    assert ofports() == {"m2": 2, "m3": 3, "m4": 1}
    saved = yaml.safe_load(d.db.read_text())["bridges"]["br0"]["ports"]
    assert {n: p["ofport"] for n, p in saved.items()} == {"m2": 2, "m3": 3, "m4": 1}
    d.stop()
    d.start()
    assert ofports() == {"m2": 2, "m3": 3, "m4": 1}
    assert "priority=9,in_port=m3 actions=output:m2" in d.cli("dump-flows", "br0").stdout
    # a file applied without numbers keeps the running ports' numbers (nothing re-created)
    plain = {"bridges": {"br0": {"ports": {n: {"type": "memory"} for n in ("m2", "m3", "m4")}}}}
    (d.workdir / "plain.yaml").write_text(yaml.safe_dump(plain))
    applied = d.cli("apply", str(d.workdir / "plain.yaml")).stdout
    assert "add port" not in applied and "delete port" not in applied, applied
    assert ofports() == {"m2": 2, "m3": 3, "m4": 1}
    # two ports may not ask for one number
    clash = {"bridges": {"br0": {"ports": {"a": {"type": "memory", "ofport": 5},
                                           "b": {"type": "memory", "ofport": 5}}}}}
    (d.workdir / "clash.yaml").write_text(yaml.safe_dump(clash))
    r = d.cli("apply", str(d.workdir / "clash.yaml"), check=False)
    assert r.returncode != 0 and "ofport 5 is already port a's" in r.stderr, r.stderr


def test_port_changes_do_not_disturb_traffic_on_other_ports(daemon, prefix):
    d = daemon.start()
    p = prefix
    d.cli("add-br", "br0")
    for n in (1, 2):
        d.cli("add-port", "br0", f"{p}{n}", "--type", "veth", "-o", f"netns={p}{n}",
              "-o", f"peer-address=10.98.0.{n}/24")
    assert ping(f"{p}1", "10.98.0.2")
    pinger = subprocess.Popen(["ip", "netns", "exec", f"{p}1", "ping", "-q", "-i", "0.01", "-c", "400",
                               "-W", "1", "10.98.0.2"], stdout=subprocess.PIPE, text=True)
    for round_ in range(4):  # ports come and go while the two hosts talk
        d.cli("add-port", "br0", f"{p}x{round_}", "--type", "veth", "-o", f"netns={p}x{round_}")
        d.cli("add-port", "br0", f"m{round_}", "--type", "memory")
        d.cli("set-port", f"m{round_}", "tag=7")
        d.cli("del-port", f"{p}x{round_}")
    out, _ = pinger.communicate(timeout=60)
    assert pinger.returncode == 0, out
    assert " 400 received, 0% packet loss" in out, out


def test_up_with_a_metrics_section_serves_it_once(tmp_path):
    """`pyswitch up FILE` whose file sets metrics: one server on that port, none left after
    close (the configuration's commit and the start both used to start one)."""
    import socket
    import threading

    from pyswitch.config import parse_config
    from pyswitch.daemon import Daemon

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = threading.active_count()
    d = Daemon(tmp_path / "run")
    try:
        d.start(parse_config({"bridges": {}, "metrics": {"address": "127.0.0.1", "port": port}}))
        assert d.metrics is not None and d.metrics.url.endswith(f":{port}/metrics")
    finally:
        d.close()
    assert threading.active_count() == threads


def test_restore_keeps_going_when_a_port_named_by_flows_is_gone(tmp_path, prefix):
    """A saved rule naming a port that cannot be restored (its interface is gone) must not
    stop the daemon: the port is shown with its error, the other rules are installed."""
    from pyswitch.daemon import Daemon

    gone = f"{prefix}gone"
    db = tmp_path / "conf.yaml"
    db.write_text(yaml.safe_dump({"bridges": {"br0": {
        "ports": {"m1": {"type": "memory"}, gone: {"type": "veth", "options": {"existing": "true"}}},
        "flows": [f"priority=10,in_port={gone} actions=output:m1", "priority=5,in_port=m1 actions=drop"],
    }}}))
    d = Daemon(tmp_path / "run", db, None, {"enabled": False})
    try:
        d.start()
        assert gone in d.errors
        rules = d.dispatch("dump-flows", {"bridge": "br0"})
        assert len(rules) == 1 and "in_port=m1 actions=drop" in rules[0], rules
        assert d.dispatch("show", {})["bridges"][0]["ports"][1]["error"] == d.errors[gone]
        d.dispatch("del-port", {"port": gone})  # goes, with the rule naming it
        after = d.dispatch("dump-flows", {"bridge": "br0"})
        assert [r.split(", ", 6)[-1] for r in after] == [r.split(", ", 6)[-1] for r in rules]
        assert not d.errors
    finally:
        d.close()
    assert yaml.safe_load(db.read_text())["bridges"]["br0"]["flows"] == ["priority=5,in_port=m1 actions=drop"]


def test_a_failed_transaction_gives_a_deleted_bridge_back_its_rules(tmp_path, prefix):
    """del-br chained with a step that fails: the bridge comes back with its rules (it came
    back with the fail mode's default, while the configuration still listed the rules, so
    no later plan would install them)."""
    from pyswitch.config import parse_config
    from pyswitch.control import ControlError
    from pyswitch.daemon import Daemon

    d = Daemon(tmp_path / "run", None, None, {"enabled": False})
    try:
        d.start(parse_config({"bridges": {
            "br0": {"ports": {"m1": {"type": "memory"}}},
            "br1": {"ports": {"m2": {"type": "memory"}, "m3": {"type": "memory"}},
                    "flows": ["priority=5,in_port=m2 actions=output:m3"]}}}))
        before = [r.split(", ", 6)[-1] for r in d.dispatch("dump-flows", {"bridge": "br1"})]
        steps = [["del-br", {"bridge": "br1"}],
                 ["add-port", {"bridge": "br0", "port": f"{prefix}gone",
                               "settings": {"type": "veth", "options:existing": "true"}}]]
        with pytest.raises(ControlError, match="nothing was changed"):
            d.dispatch("transaction", {"commands": steps})
        after = [r.split(", ", 6)[-1] for r in d.dispatch("dump-flows", {"bridge": "br1"})]
        assert after == before == ["priority=5,in_port=m2 actions=output:m3"]
        assert [d.switch.port_number(n) for n in ("m2", "m3")] == [1, 2]  # ofports kept
    finally:
        d.close()


def test_a_re_created_port_keeps_its_ofport_and_its_rules_keep_matching(tmp_path):
    """Changing a port's options re-creates it; it must come back under the same ofport,
    since the bridge's rules hold port numbers (with a gap below it, it took the lowest
    free number and the rules naming it silently stopped matching)."""
    from pyswitch.config import parse_config
    from pyswitch.daemon import Daemon
    from tests.test_bridge import BCAST, frame, mac

    d = Daemon(tmp_path / "run", None, None, {"enabled": False})
    try:
        d.start(parse_config({"bridges": {"br0": {
            "ports": {n: {"type": "memory"} for n in ("m1", "m2", "m3")},
            "flows": ["priority=5,in_port=m3 actions=output:m1"]}}}))
        d.dispatch("del-port", {"port": "m2"})
        d.dispatch("set-port", {"port": "m3", "settings": {"options:capacity": "8"}})
        assert d.switch.port_number("m3") == 3
        d.switch.port("m3").inject([frame(BCAST, mac(3))])
        for _ in range(5):
            d.switch.loop.run_once(max_wait=0.01)
        assert len(d.switch.port("m1").sent) == 1
    finally:
        d.close()


def test_a_port_that_failed_to_restore_does_not_block_other_changes(tmp_path, prefix):
    """After a restore in which one port failed (its interface is gone), an unrelated change
    applies; the failed port stays in the configuration with its error, and a change to
    that port itself retries it (every request used to retry it and be refused)."""
    from pyswitch.control import ControlError
    from pyswitch.daemon import Daemon

    gone = f"{prefix}gone"
    db = tmp_path / "conf.yaml"
    db.write_text(yaml.safe_dump({"bridges": {"br0": {"ports": {
        "m1": {"type": "memory"}, gone: {"type": "veth", "options": {"existing": "true"}}}}}}))
    d = Daemon(tmp_path / "run", db, None, {"enabled": False})
    try:
        d.start()
        assert gone in d.errors
        d.dispatch("add-port", {"bridge": "br0", "port": "m2", "settings": {"type": "memory"}})
        assert d.switch.port_names("br0") == ["m1", "m2"] and gone in d.errors
        ports = {p["name"]: p for p in d.dispatch("show", {})["bridges"][0]["ports"]}
        assert "no interface" in ports[gone]["error"] and ports["m2"]["link_state"] == "up"
        assert set(yaml.safe_load(db.read_text())["bridges"]["br0"]["ports"]) == {"m1", gone, "m2"}
        with pytest.raises(ControlError, match="nothing was changed"):  # a change to it: retried
            d.dispatch("set-port", {"port": gone, "settings": {"tag": "5"}})
        assert gone in d.errors and "tag" not in yaml.safe_load(db.read_text())["bridges"]["br0"]["ports"][gone]
    finally:
        d.close()


def test_may_exist_add_port_on_another_bridge_is_refused(tmp_path):
    """As ovs-vsctl: `--may-exist add-port br1 p` when p is on br0 is an error, not a
    silent success that leaves p where it was."""
    from pyswitch.config import parse_config
    from pyswitch.control import ControlError
    from pyswitch.daemon import Daemon

    d = Daemon(tmp_path / "run", None, None, {"enabled": False})
    try:
        d.start(parse_config({"bridges": {"br0": {"ports": {"m1": {"type": "memory"}}},
                                          "br1": {"ports": {}}}}))
        d.dispatch("add-port", {"bridge": "br0", "port": "m1", "may_exist": True})  # same bridge: ok
        d.dispatch("add-port", {"port": "m1", "may_exist": True})  # no bridge named: ok
        with pytest.raises(ControlError, match="m1 already exists on bridge br0"):
            d.dispatch("add-port", {"bridge": "br1", "port": "m1", "may_exist": True})
        assert d.switch.port_bridge("m1") == "br0"
    finally:
        d.close()


def test_a_re_created_port_keeps_its_ofport_when_a_new_port_is_listed_first(tmp_path):
    """`apply` of a file that lists a new port before one it re-creates: the new port must
    not take the re-created port's freed number."""
    from pyswitch.config import parse_config
    from pyswitch.daemon import Daemon

    d = Daemon(tmp_path / "run", None, None, {"enabled": False})
    try:
        d.start(parse_config({"bridges": {"br0": {"ports": {"m1": {"type": "memory"},
                                                            "m2": {"type": "memory"}}}}}))
        d.dispatch("apply", {"config": {"bridges": {"br0": {"ports": {
            "m3": {"type": "memory"}, "m1": {"type": "memory", "options": {"capacity": 8}},
            "m2": {"type": "memory"}}}}}})
        assert [d.switch.port_number(n) for n in ("m1", "m2", "m3")] == [1, 2, 3]
    finally:
        d.close()
