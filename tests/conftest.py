"""Shared pytest configuration.

Fixtures that many test modules use are registered once here as plugins, so modules use
them by name without importing them: ``prefix`` and ``pyswitch_up`` (tests/switch_proc.py,
a ``pyswitch up`` process), ``daemon`` and ``open_rundir`` (tests/daemon_proc.py, a
``pyswitch daemon`` process), ``datapath`` (tests/datapaths.py, each test once per data
path, python and compiled).  Area-specific helpers stay in their own modules.
"""

pytest_plugins = ["tests.switch_proc", "tests.daemon_proc", "tests.datapaths"]
