"""Port types of pyswitch, installed as ``pyswitch.ports``.

Each module registers one port type by name through the ``pyswitch.port_types``
entry-point group (see pyproject.toml); the core looks types up by that name.
"""
