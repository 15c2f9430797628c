"""OpenFlow-style flow rules: parsing, matching, actions, and the flow cache.

The pieces, each pure (no I/O, no clock: ``now`` is a parameter):

* :mod:`.key`      frame -> :class:`FlowKey` (hashable; the flow cache key)
* :mod:`.parse`    ovs-ofctl flow strings -> :class:`Flow` / :class:`FlowFilter`
* :mod:`.format`   back to ovs-ofctl syntax, dump-flows lines, JSON-able dicts
* :mod:`.table`    :class:`FlowTables`: add/modify/delete/lookup/expire, ``generation``
* :mod:`.actions`  :func:`decide` a key into a cacheable :class:`Decision`; ``apply`` it

See docs/flows.md.
"""

from .actions import Decision, decide, execute
from .format import entry_to_dict, format_dump_line, format_flow, format_match
from .key import FlowKey, extract
from .model import Action, Flow, FlowFilter, FlowSyntaxError, Match, PortNames
from .parse import parse_filter, parse_flow
from .table import FlowEntry, FlowTables, install_default

__all__ = [
    "Action",
    "Decision",
    "Flow",
    "FlowEntry",
    "FlowFilter",
    "FlowKey",
    "FlowSyntaxError",
    "FlowTables",
    "Match",
    "PortNames",
    "decide",
    "entry_to_dict",
    "execute",
    "extract",
    "format_dump_line",
    "format_flow",
    "format_match",
    "install_default",
    "parse_filter",
    "parse_flow",
]
