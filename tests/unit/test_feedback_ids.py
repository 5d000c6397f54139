"""Time-ordered event ids: UUIDv7 layout, ascending with the clock, reproducible when seeded."""

import uuid

import numpy as np

from feedback.ids import uuid7_batch


def test_uuid7_layout():
    ids = uuid7_batch(64, ts=1_750_000_000.123)
    for hex_id in ids:
        assert len(hex_id) == 32  # like uuid4().hex: what `recommend` returns as request_id
        u = uuid.UUID(hex=hex_id)
        assert (u.version, u.variant) == (7, uuid.RFC_4122)
        assert u.int >> 80 == 1_750_000_000_123  # the unix ms prefix


def test_batches_ascend_and_are_unique():
    ids = uuid7_batch(5000, ts=1_750_000_000.0)
    assert list(ids) == sorted(ids) and len(set(ids)) == 5000
    later = uuid7_batch(10, ts=1_750_000_000.5)
    assert min(later) > max(ids)  # a later millisecond sorts after
    per_row = uuid7_batch(3, ts=np.array([3.0, 1.0, 2.0]) + 1.75e9)
    assert [uuid.UUID(hex=x).int >> 80 for x in per_row] == [
        1_750_000_003_000,
        1_750_000_001_000,
        1_750_000_002_000,
    ]


def test_seeded_batches_repeat():
    a = uuid7_batch(4, ts=1.75e9, rng=np.random.default_rng(1))
    b = uuid7_batch(4, ts=1.75e9, rng=np.random.default_rng(1))
    assert list(a) == list(b)
