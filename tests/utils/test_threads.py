"""Torch's CPU threads follow the CPUs this process may really use, shared among its siblings."""

from __future__ import annotations

import os

import pytest

from src.utils import threads


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A machine of 8 CPUs in the affinity mask and a configurable cgroup quota."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.0)
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr(threads, "CGROUP_ROOT", cgroup)
    return cgroup


def test_affinity_and_quota(machine):
    assert threads.choose_threads() == (8, "8 usable CPUs")
    (machine / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cpus() == 8
    (machine / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs of quota
    assert threads.usable_cpus() == 2


def test_cgroup_v1_quota(machine):
    (machine / "cpu").mkdir()
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (machine / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.usable_cpus() == 3
    (machine / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert threads.usable_cpus() == 8


def test_shared_among_ranks_and_loader_workers(machine):
    assert threads.choose_threads(processes=4)[0] == 2
    threads_each, why = threads.choose_threads(processes=2, loader_workers=2)
    assert threads_each == 2 and "2 processes on this node" in why and "2 data loader workers" in why
    assert threads.choose_threads(processes=8, loader_workers=4)[0] == 1  # never below one


def test_omp_num_threads_wins(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(processes=4) == (3, "OMP_NUM_THREADS is set")


def test_configure_sets_torch_and_logs_once(machine, caplog):
    import logging

    import torch

    before = torch.get_num_threads()
    (machine / "cpu.max").write_text("100000 100000\n")
    try:
        with caplog.at_level(logging.INFO, logger="src.utils.threads"):
            assert threads.configure_threads() == 1
        assert torch.get_num_threads() == 1
        assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
        assert "torch uses 1 CPU thread (1 usable CPUs" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_cpus_busy_with_other_work_are_left_to_it(machine, monkeypatch):
    monkeypatch.setattr(threads, "busy_cpus", lambda: 5.2)
    threads_each, why = threads.choose_threads()
    assert threads_each == 3 and "5.2 of them busy with other work" in why
    assert threads.choose_threads(processes=2)[0] == 1
    monkeypatch.setattr(threads, "busy_cpus", lambda: 0.3)  # background noise: not worth a thread
    assert threads.choose_threads()[0] == 8
    assert threads.choose_threads(probe=False)[0] == 8


def test_busy_cpus_reads_proc_stat():
    busy = threads.busy_cpus(0.05)
    assert busy is None or 0.0 <= busy <= threads.usable_cpus() + 0.01


def test_a_resumed_run_keeps_the_thread_count_of_its_checkpoint(monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threads.keep_threads_of_run(1)
        assert torch.get_num_threads() == 1
        threads.keep_threads_of_run(None)  # a checkpoint from before the count was recorded: unchanged
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        threads.keep_threads_of_run(3)  # the user's setting wins
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
