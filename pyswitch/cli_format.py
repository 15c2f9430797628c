"""Text forms of the daemon's answers, in the shapes ovs-vsctl and ovs-appctl users know."""

from __future__ import annotations

from typing import Any


def _options_text(options: dict[str, str]) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(options.items())) + "}"


def show(data: dict[str, Any]) -> str:
    """Like ``ovs-vsctl show``: bridges, ports, interfaces, their types, options and state."""
    lines: list[str] = []
    dp = data.get("datapath")
    if dp:
        lines.append(f"    datapath: {dp['active']} (requested {dp['requested']}, pmd {dp['pmd']})")
    for br in data["bridges"]:
        lines.append(f"    Bridge {br['name']}")
        lines.append(f"        fail_mode: {br['fail_mode']}")
        lines.append(f"        mac_aging_time: {br['mac_aging_time']}, mac_table_size: {br['mac_table_size']}")
        for p in br["ports"]:
            lines.append(f"        Port {p['name']}")
            for key in ("tag", "trunks", "vlan_mode"):
                if key in p:
                    value = p[key]
                    if isinstance(value, list):
                        value = "[" + ", ".join(str(v) for v in value) + "]"
                    lines.append(f"            {key}: {value}")
            lines.append(f"            Interface {p['name']}")
            lines.append(f"                type: {p['type']}")
            if p.get("ofport") is not None:
                lines.append(f"                ofport: {p['ofport']}")
            if p.get("options"):
                lines.append(f"                options: {_options_text(p['options'])}")
            lines.append(f"                link_state: {p.get('link_state', 'down')}")
            if p.get("error"):
                lines.append(f'                error: "{p["error"]}"')
            for key, value in sorted((p.get("status") or {}).items()):
                lines.append(f"                status:{key}: {value}")
    return "\n".join(lines)


def fdb(entries: list[dict[str, Any]]) -> str:
    """ovs-appctl fdb/show: `` port  VLAN  MAC                Age``."""
    rows = [" port  VLAN  MAC                Age"]
    for e in entries:
        rows.append(f"{e['port']:5d}  {e['vlan']:4d}  {e['mac']}  {e['age']:3d}")
    return "\n".join(rows)


def port_stats(stats: dict[str, dict[str, Any]]) -> str:
    """In the spirit of ovs-ofctl dump-ports, with drops by reason."""
    lines = [f"{len(stats)} ports"]
    for name, s in stats.items():
        lines.append(f"  port {s['ofport']:2d} ({name}, {s['type']}, bridge {s['bridge']}): "
                     f"rx pkts={s['rx_packets']}, bytes={s['rx_bytes']}, drop={s['rx_dropped']}, "
                     f"errs={s['rx_errors']}")
        lines.append(f"{'':>10}tx pkts={s['tx_packets']}, bytes={s['tx_bytes']}, "
                     f"drop={s['tx_dropped']}, errs={s['tx_errors']}")
        drops = {k: v for k, v in (s.get("drops") or {}).items() if v}
        if drops:
            lines.append(f"{'':>10}drops: " + ", ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    return "\n".join(lines)
