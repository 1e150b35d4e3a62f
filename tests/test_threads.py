"""The thread model of an adapted model: concurrent callers are served one at a time.

``method(x)``, ``reset()``, ``state_dict()`` and ``load_state_dict()`` hold the method's
re-entrant lock, so one adapted model shared by several threads never interleaves two steps
(Tent's autograd graph, SAR's ascend/restore pair), and the counters count exactly the calls made.
"""
import copy
import threading

import pytest
import torch

import tta
from tta.models import load_classifier

THREADS, CALLS = 4, 25


def hammer(method, calls_per_thread=CALLS, threads=THREADS, also=None):
    """``threads`` threads each calling ``method`` ``calls_per_thread`` times at once; the errors."""
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(k):
        g = torch.Generator().manual_seed(k)
        barrier.wait()
        for i in range(calls_per_thread):
            try:
                method(torch.rand(8, 3, 32, 32, generator=g))
                if also is not None and i % 5 == 0:
                    also(method)
            except BaseException as error:  # noqa: BLE001 (collected, asserted below)
                errors.append(error)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return errors


@pytest.mark.parametrize("name", ["tent", "sar"])
def test_concurrent_callers_are_serialised(name):
    torch.set_num_threads(2)  # ops release the GIL: the threads really run side by side
    method = tta.methods.build(name, load_classifier("digits_cnn"))
    errors = hammer(method)
    assert not errors, f"{len(errors)} failed calls, first: {errors[0]!r}"
    counters = method.stats()["counters"]
    assert counters["batches"] == THREADS * CALLS
    assert counters["samples"] == THREADS * CALLS * 8
    assert counters["forwards"] == THREADS * CALLS * (2 if name == "sar" else 1)
    assert all(torch.isfinite(p).all() for p in method.adapted_parameters())


def test_reset_and_state_dict_from_other_threads_are_safe():
    method = tta.methods.build("sar", load_classifier("digits_cnn"))
    saved = {}

    def admin(m):  # a monitoring thread saves and rolls back while others serve
        saved["state"] = copy.deepcopy(m.state_dict())
        m.reset()

    errors = hammer(method, calls_per_thread=10, also=admin)
    assert not errors, repr(errors[0])
    method.load_state_dict(saved["state"])
    assert method.stats()["counters"]["batches"] >= 1


def test_the_lock_is_reentrant_and_per_copy():
    method = tta.methods.build("tent", load_classifier("digits_cnn"))
    with method.lock:  # several calls as one atomic unit
        method(torch.rand(4, 3, 32, 32))
        state = method.state_dict()
        method.reset()
        method.load_state_dict(state)
    twin = copy.deepcopy(method)
    assert twin.lock is not method.lock
    acquired = threading.Event()
    release = threading.Event()

    def hold():
        with method.lock:
            acquired.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    acquired.wait(5)
    twin(torch.rand(4, 3, 32, 32))  # a copy does not wait for the original's lock
    blocked = threading.Thread(target=lambda: method(torch.rand(4, 3, 32, 32)))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the original waits while another thread holds its lock
    release.set()
    blocked.join(5)
    holder.join(5)
    assert method.stats()["counters"]["batches"] == 2
