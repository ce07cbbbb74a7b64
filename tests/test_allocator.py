"""grpo.allocator: glibc's malloc keeps freed memory inside `keep_freed_memory` and gets its defaults back after,
left alone when disabled or when the user set MALLOC_* variables."""

from __future__ import annotations

import pytest

from grpo import allocator


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "glibc", lambda: fake)
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return fake


def test_inside_nothing_is_unmapped_or_trimmed_and_the_defaults_come_back_after(libc):
    with allocator.keep_freed_memory() as switched:
        assert switched
        assert libc.calls == [("mallopt", allocator.M_MMAP_MAX, 0), ("mallopt", allocator.M_TRIM_THRESHOLD, -1)]
    assert libc.calls[2:] == [("mallopt", allocator.M_MMAP_MAX, 65536),
                              ("mallopt", allocator.M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]


def test_the_defaults_come_back_when_the_run_raises(libc):
    with pytest.raises(RuntimeError), allocator.keep_freed_memory():
        raise RuntimeError("a failed step")
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_left_alone_when_disabled_or_set_by_the_user(libc, monkeypatch):
    with allocator.keep_freed_memory(enabled=False) as switched:
        assert not switched
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    with allocator.keep_freed_memory() as switched:
        assert not switched
    assert libc.calls == []


def test_switches_on_this_machines_glibc(monkeypatch):
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with allocator.keep_freed_memory() as switched:
        assert switched == (allocator.glibc() is not None)  # Linux with glibc, as CI


def test_a_run_resumes_with_the_setting_changed():
    """How memory is allocated changes no number of the run (the demo gives -1.547 either way), so a resume may
    switch it."""
    from grpo.checkpoint import _differing_settings

    assert _differing_settings({"cpu_keep_freed_memory": True, "seed": 1},
                               {"cpu_keep_freed_memory": False, "seed": 1}) == []
    assert _differing_settings({"seed": 1}, {"seed": 2}) == ["seed: 1 -> 2"]
