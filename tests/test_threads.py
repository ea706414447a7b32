"""The engine's thread governor (memdec_fast/engine/threads.py): steps run on the cores other processes leave free."""

from __future__ import annotations

import threading

import pytest
import torch

from memdec_fast.engine.threads import ThreadGovernor, host_busy_seconds


class Host:
    """Fake readings: the wall clock, the host's busy CPU seconds, this process's CPU seconds."""

    def __init__(self):
        self.t = self.host = self.own = 0.0

    def advance(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.t += seconds
        self.own += seconds * own_cores
        self.host += seconds * (own_cores + other_cores)

    def governor(self, cores: int = 2) -> ThreadGovernor:
        return ThreadGovernor(interval=0.5, cores=cores, host_seconds=lambda: self.host, own_seconds=lambda: self.own,
                              clock=lambda: self.t)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_busy_core_takes_a_thread_away_and_an_idle_one_gives_it_back(two_threads):
    host = Host()
    gov = host.governor()
    host.advance(0.2, own_cores=2.0, other_cores=0.0)
    assert gov.update() == 2  # under the interval: no look yet
    host.advance(0.4, own_cores=1.0, other_cores=1.0)  # another process takes a core
    assert gov.update() == 1 and torch.get_num_threads() == 1
    for _ in range(6):  # it stops: the moving average comes down, the thread comes back
        host.advance(0.6, own_cores=2.0, other_cores=0.0)
        gov.update()
    assert gov.threads == 2 and torch.get_num_threads() == 2 and gov.others < 0.1


def test_a_brief_spike_does_not_flip_the_count(two_threads):
    host = Host()
    gov = host.governor()
    for other in (0.1, 0.2, 0.9, 0.1, 0.2):  # one window of 0.9: the average stays under half a core
        host.advance(0.6, own_cores=1.9, other_cores=other)
        assert gov.update() == 2


def test_many_cores_keep_the_threads_the_loop_started_with(two_threads):
    host = Host()
    gov = host.governor(cores=16)
    host.advance(1.0, own_cores=2.0, other_cores=5.0)  # 11 free cores: 2 threads still fit
    assert gov.update() == 2


def test_the_readings_are_real_on_this_host():
    assert host_busy_seconds() is None or host_busy_seconds() > 0
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ThreadGovernor().max_threads))  # as the engine's loop
    thread.start()
    thread.join()
    assert seen == [torch.get_num_threads()]


def test_restore_gives_back_the_starting_count(two_threads):
    host = Host()
    gov = host.governor()
    host.advance(1.0, own_cores=1.0, other_cores=1.0)
    assert gov.update() == 1
    gov.restore()
    assert gov.threads == 2 and torch.get_num_threads() == 2


def test_a_generate_call_on_a_busy_host_leaves_the_callers_thread_count_as_it_was(ckpts, monkeypatch, two_threads):
    from memdec_fast import JointGenerator
    from memdec_fast.engine import threads

    seen = []
    real_update = threads.ThreadGovernor.update

    def busy_update(self):  # the host looks fully busy from the first step: the loop drops to 1 thread
        self.others, self._last = 2.0, (self.clock() - 1.0, 0.0, 0.0)
        self.host_seconds = lambda: 2.0  # the other processes took 2 CPU seconds over the last second
        self.own_seconds = lambda: 0.0
        seen.append(real_update(self))
        return seen[-1]

    monkeypatch.setattr(threads.ThreadGovernor, "update", busy_update)
    gen = JointGenerator.from_pretrained(ckpts["base"], ckpts["decoder"], lmbda=0.4, cuda_graphs=False)
    gen.generate("hello world", max_new_tokens=3)
    assert seen and set(seen) == {1}  # the steps ran on one thread ...
    assert torch.get_num_threads() == 2  # ... and the caller got its two back
