"""VLAN membership of a bridge port, with Open vSwitch's semantics.

A port's VLAN setting is the OVSDB ``Port`` columns ``tag``, ``trunks`` and ``vlan_mode``:

``access`` (the default when ``tag`` is set)
    Carries VLAN ``tag`` only.  Frames enter untagged (a priority tag, VID 0, counts as
    untagged) and take VLAN ``tag`` inside the bridge; they leave untagged.  A frame that
    arrives tagged with a non-zero VID is dropped.
``trunk`` (the default when ``tag`` is not set)
    Carries the VLANs in ``trunks``, or every VLAN when ``trunks`` is empty.  A frame
    enters in the VLAN of its 802.1Q header, or VLAN 0 when untagged; it leaves tagged
    unless its VLAN is 0.
``native-tagged``
    A trunk whose ``tag`` is the native VLAN: untagged frames enter in VLAN ``tag``;
    every frame leaves tagged, native VLAN included.
``native-untagged``
    As native-tagged, but frames of the native VLAN leave untagged.

Inside the bridge every frame has exactly one VLAN number (0..4095).  :meth:`PortVlan.
ingress` maps a received frame's VID to that number or refuses it; :meth:`PortVlan.
egress` says whether and how a frame of a VLAN leaves the port.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VLAN_MODES = ("access", "trunk", "native-tagged", "native-untagged")

# egress() results
NOT_CARRIED = 0
UNTAGGED = 1
TAGGED = 2


class VlanConfigError(ValueError):
    """An impossible combination of tag, trunks and vlan_mode."""


@dataclass(frozen=True, slots=True)
class PortVlan:
    """A validated VLAN setting; build with :meth:`make`."""

    mode: str = "trunk"
    tag: int | None = None
    trunks: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def make(
        cls, tag: int | None = None, trunks: frozenset[int] | set[int] | list[int] | None = None,
        vlan_mode: str | None = None,
    ) -> "PortVlan":
        """Validate and apply OVS's defaults (access if ``tag`` else trunk)."""
        trunk_set = frozenset(trunks or ())
        for vid in trunk_set:
            if not 0 <= vid <= 4095:
                raise VlanConfigError(f"trunks: {vid} is not a VLAN ID (0-4095)")
        if tag is not None and not 1 <= tag <= 4095:
            raise VlanConfigError(f"tag: {tag} is not a VLAN ID (1-4095)")
        mode = vlan_mode or ("access" if tag is not None else "trunk")
        if mode not in VLAN_MODES:
            raise VlanConfigError(f"vlan_mode: {mode!r} is not one of {', '.join(VLAN_MODES)}")
        if mode == "access" and tag is None:
            raise VlanConfigError("vlan_mode access needs a tag")
        if mode.startswith("native") and tag is None:
            raise VlanConfigError(f"vlan_mode {mode} needs a tag (the native VLAN)")
        if mode == "access" and trunk_set:
            raise VlanConfigError("an access port has no trunks")
        if mode == "trunk" and tag is not None:
            raise VlanConfigError("a trunk port has no tag (use native-tagged/native-untagged)")
        return cls(mode, tag, trunk_set)

    def carries(self, vlan: int) -> bool:
        """Whether frames of ``vlan`` may enter or leave this port."""
        if self.mode == "access":
            return vlan == self.tag
        if vlan == self.tag:
            return True
        return not self.trunks or vlan in self.trunks

    def ingress(self, vid: int | None) -> int | None:
        """The bridge VLAN of a frame received with 802.1Q VID ``vid`` (None when
        untagged), or None when the port must drop it."""
        if vid == 0:
            vid = None  # priority-tagged: no VLAN
        if self.mode == "access":
            return self.tag if vid is None else None
        if vid is None:
            vlan = self.tag if self.tag is not None else 0
        else:
            vlan = vid
        return vlan if self.carries(vlan) else None

    def egress(self, vlan: int) -> int:
        """NOT_CARRIED, UNTAGGED or TAGGED for a frame of bridge VLAN ``vlan``."""
        if not self.carries(vlan):
            return NOT_CARRIED
        if self.mode == "access" or vlan == 0:
            return UNTAGGED
        if self.mode == "native-untagged" and vlan == self.tag:
            return UNTAGGED
        return TAGGED

    def as_dict(self) -> dict:
        d: dict = {}
        if self.tag is not None:
            d["tag"] = self.tag
        if self.trunks:
            d["trunks"] = sorted(self.trunks)
        default_mode = "access" if self.tag is not None else "trunk"
        if self.mode != default_mode:
            d["vlan_mode"] = self.mode
        return d
