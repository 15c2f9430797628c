"""The MAC table on its own: learning, moves, aging (lazy and swept), the size limit."""

from pyswitch.fdb import MacTable

A = bytes.fromhex("020000000001")
B = bytes.fromhex("020000000002")


def test_learn_and_lookup_per_vlan():
    t = MacTable()
    t.learn(10, A, 1, now=0)
    assert t.lookup(10, A, now=1) == 1
    assert t.lookup(20, A, now=1) is None  # learning is per VLAN
    assert t.stats.learned == 1


def test_move_relearns_on_new_port():
    t = MacTable()
    t.learn(0, A, 1, now=0)
    g = t.generation
    t.learn(0, A, 2, now=1)
    assert t.lookup(0, A, now=1) == 2
    assert t.stats.moved == 1 and t.generation > g


def test_lazy_aging_on_lookup():
    t = MacTable(aging_time=10)
    t.learn(0, A, 1, now=0)
    assert t.lookup(0, A, now=9.9) == 1
    assert t.lookup(0, A, now=10) is None
    assert len(t) == 0 and t.stats.aged == 1


def test_refresh_keeps_entry_alive():
    t = MacTable(aging_time=10)
    t.learn(0, A, 1, now=0)
    t.learn(0, A, 1, now=8)
    assert t.lookup(0, A, now=15) == 1


def test_sweep_removes_only_old_entries():
    t = MacTable(aging_time=10)
    t.learn(0, A, 1, now=0)
    t.learn(0, B, 2, now=5)
    assert t.expire(now=12) == 1
    assert t.lookup(0, A, now=12) is None
    assert t.lookup(0, B, now=12) == 2


def test_size_limit_evicts_least_recently_seen():
    t = MacTable(max_entries=2)
    t.learn(0, A, 1, now=0)
    t.learn(0, B, 2, now=1)
    t.learn(0, A, 1, now=2)  # A is now the most recent
    c = bytes.fromhex("020000000003")
    t.learn(0, c, 3, now=3)
    assert len(t) == 2
    assert t.lookup(0, B, now=3) is None  # B was the oldest
    assert t.lookup(0, A, now=3) == 1 and t.lookup(0, c, now=3) == 3
    assert t.stats.evicted == 1


def test_aging_zero_disables_learning():
    t = MacTable(aging_time=0)
    t.learn(0, A, 1, now=0)
    assert len(t) == 0 and t.lookup(0, A, now=0) is None


def test_flush_by_port_and_vlan():
    t = MacTable()
    t.learn(1, A, 1, now=0)
    t.learn(2, A, 2, now=0)
    t.learn(1, B, 2, now=0)
    assert t.flush(port=2, vlan=1) == 1
    assert t.lookup(1, B, now=0) is None and t.lookup(2, A, now=0) == 2
    assert t.flush() == 2 and len(t) == 0


def test_entries_report_age():
    t = MacTable()
    t.learn(7, A, 3, now=100)
    assert t.entries(now=104) == [(3, 7, A, 4)]
