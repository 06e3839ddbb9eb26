"""A suite shaped like integration tests: each waits on I/O (a sleep stands in for
a database or service round trip) and does a little work."""
import hashlib
import time

import pytest


def invoice_total(lines):
    return sum(quantity * cents for quantity, cents in lines)


@pytest.mark.parametrize("case", range(40))
def test_invoice(case):
    time.sleep(0.25)
    lines = [(1 + (case + i) % 3, 100 + 17 * i) for i in range(50)]
    digest = hashlib.sha256(repr(lines).encode()).hexdigest()
    assert len(digest) == 64
    assert invoice_total(lines) == sum(q * c for q, c in lines)
