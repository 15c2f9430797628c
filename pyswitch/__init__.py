"""pyswitch: a software virtual switch in the image of Open vSwitch with DPDK."""

__version__ = "0.1.0"
