"""Shared pytest configuration.  Area-specific fixtures live in their own modules
(tests/netns_util.py, tests/peers/...) and are imported where used."""
