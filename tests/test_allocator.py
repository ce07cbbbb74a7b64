"""grpo.allocator: inside `keep_freed_memory` torch's CPU tensors go to the tensor cache (reused by size class,
bounded by the high-water mark of memory in use), or where it cannot be built glibc's malloc keeps freed memory
and gets its defaults back after; left alone when disabled or when the user set MALLOC_* variables."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from grpo import allocator

MiB = 2**20


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
    monkeypatch.setattr(allocator, "tensor_cache", lambda: None)
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return fake


def test_inside_nothing_is_unmapped_or_trimmed_and_the_defaults_come_back_after(libc):
    with allocator.keep_freed_memory() as switched:
        assert switched == "glibc"
        assert libc.calls == [("mallopt", allocator.M_MMAP_MAX, 0), ("mallopt", allocator.M_TRIM_THRESHOLD, -1)]
    assert libc.calls[2:] == [("mallopt", allocator.M_MMAP_MAX, 65536),
                              ("mallopt", allocator.M_TRIM_THRESHOLD, 128 * 1024), ("malloc_trim", 0)]


def test_the_defaults_come_back_when_the_run_raises(libc):
    with pytest.raises(RuntimeError), allocator.keep_freed_memory():
        raise RuntimeError("a failed step")
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_left_alone_when_disabled_or_set_by_the_user(libc, monkeypatch):
    with allocator.keep_freed_memory(enabled=False) as switched:
        assert switched is None
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    with allocator.keep_freed_memory() as switched:
        assert switched is None
    assert libc.calls == []


def test_switches_on_this_machines_glibc(monkeypatch):
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with allocator.keep_freed_memory() as switched:
        expected = "tensor cache" if allocator.tensor_cache() else "glibc" if allocator.glibc() else None
        assert switched == expected  # CI: Linux with glibc and g++, so the tensor cache


def test_a_run_resumes_with_the_setting_changed():
    """How memory is allocated changes no number of the run (the demo gives -1.312 either way), so a resume may
    switch it."""
    from grpo.checkpoint import _differing_settings

    assert _differing_settings({"cpu_keep_freed_memory": True, "seed": 1},
                               {"cpu_keep_freed_memory": False, "seed": 1}) == []
    assert _differing_settings({"seed": 1}, {"seed": 2}) == ["seed: 1 -> 2"]


@pytest.fixture
def cache(monkeypatch):
    """The tensor cache installed with its default bounds; yields a function giving its counters' change."""
    if allocator.tensor_cache() is None:
        pytest.skip("no C++ compiler or torch headers")
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with allocator.keep_freed_memory() as how:
        assert how == "tensor cache"
        start = allocator.tensor_cache_stats()
        yield lambda: {key: value - start[key] for key, value in allocator.tensor_cache_stats().items()}


def test_a_freed_tensor_is_reused_by_the_next_of_its_size_class(cache):
    first = torch.empty(MiB // 4)  # 1 MiB: its own mapping
    address = first.data_ptr()
    assert cache()["in_use"] == MiB and cache()["mapped"] == 1
    del first
    assert cache()["in_use"] == 0 and cache()["idle"] == MiB
    second = torch.empty(MiB // 4 - 100)  # 400 bytes smaller: the same class
    assert second.data_ptr() == address and cache()["reused"] == 1 and cache()["idle"] == 0
    odd = torch.empty(MiB // 4 + 1, dtype=torch.float32)  # 1 MiB + 4 bytes: the next class, 1/8 up
    assert cache()["in_use"] == MiB + MiB * 9 // 8
    small = torch.empty(1000)  # under the threshold: malloc's
    assert cache()["in_use"] == MiB + MiB * 9 // 8 and small.data_ptr() % 64 == 0
    del odd, second


def test_idle_memory_never_lifts_the_mapped_total_past_the_high_water_mark_plus_the_slack(cache):
    slack = allocator.TENSOR_CACHE_SLACK
    blocks = [torch.empty(slack // 4) for _ in range(4)]  # in use: 4 x slack (untouched, so not resident)
    assert cache()["high_water"] == 4 * slack
    del blocks[:3]
    assert cache()["idle"] == 3 * slack  # kept: in use + idle is still the high-water mark
    bigger = torch.empty(7 * slack // 8)  # 3.5 x slack: no idle block within a factor 2, so a fresh mapping,
    stats = cache()  # which needs the two oldest idle blocks unmapped first
    assert stats["high_water"] == 4.5 * slack and stats["unmapped"] == 2 and stats["idle"] == slack
    assert stats["in_use"] + stats["idle"] <= stats["high_water"] + slack
    del bigger


def test_a_block_of_a_nearby_size_is_resized_instead_of_mapping_a_fresh_one(cache):
    first = torch.ones(MiB // 4)  # 1 MiB, its pages touched
    del first
    grown = torch.empty(3 * MiB // 8)  # 1.5 MiB: the idle 1 MiB block grows into it
    assert cache()["reused"] == 1 and cache()["mapped"] == 1 and cache()["idle"] == 0
    kept = grown[: MiB // 4]  # mremap kept the pages' values (torch.empty sets none); reductions map nothing
    assert kept.min().item() == kept.max().item() == 1.0
    del grown, kept
    shrunk = torch.empty(MiB // 4)  # and shrinks back
    assert cache()["reused"] == 2 and cache()["mapped"] == 1 and cache()["in_use"] == MiB
    del shrunk


def test_the_bound_holds_through_a_random_sequence(cache):
    """Rounds of tensors of random sizes (32 KiB to 48 MiB, untouched), most freed at each round's end."""
    generator = torch.Generator().manual_seed(0)
    held: list[torch.Tensor] = []
    for _ in range(30):
        for _ in range(6):
            held.append(torch.empty(int(torch.randint(8 * 1024, 12 * MiB, (), generator=generator))))
            stats = cache()
            assert stats["in_use"] + stats["idle"] <= stats["high_water"] + allocator.TENSOR_CACHE_SLACK
        del held[:-1]
    assert cache()["reused"] > 0


def test_tensors_hold_their_values_and_gradients_match_the_default_allocator(cache):
    """The same computation inside the cache and outside it: bit-identical (only where memory comes from
    changes)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, generator=generator, requires_grad=True)
    inputs = torch.randn(256, 512, generator=generator)

    def step():
        weight.grad = None
        loss = torch.tanh(inputs @ weight).pow(2).sum()
        loss.backward()
        return loss.detach().clone(), weight.grad.clone()

    inside = [step() for _ in range(3)]
    assert cache()["reused"] > 0
    allocator.tensor_cache().grpo_tensor_cache_uninstall()
    try:
        outside = step()
    finally:
        assert allocator.tensor_cache().grpo_tensor_cache_install(allocator.TENSOR_CACHE_THRESHOLD,
                                                                  allocator.TENSOR_CACHE_SLACK)
    for loss, grad in inside:
        assert torch.equal(loss, outside[0]) and torch.equal(grad, outside[1])


def test_after_the_run_torch_allocates_as_before_and_late_frees_unmap(monkeypatch):
    if allocator.tensor_cache() is None:
        pytest.skip("no C++ compiler or torch headers")
    for name in allocator.MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with allocator.keep_freed_memory():
        survivor = torch.ones(MiB // 4)  # made inside, freed after
        idle = torch.empty(MiB // 4)
        del idle
    after = allocator.tensor_cache_stats()
    assert after["idle"] == 0  # idle blocks went back on exit
    outside = torch.empty(MiB)
    assert allocator.tensor_cache_stats()["in_use"] == after["in_use"]  # not the cache's
    assert survivor.sum().item() == MiB // 4
    del survivor, outside
    assert allocator.tensor_cache_stats()["in_use"] == after["in_use"] - MiB
    assert allocator.tensor_cache_stats()["idle"] == 0


def test_threads_allocate_and_free_at_once(cache):
    errors = []

    def churn(seed: int) -> None:
        try:
            for step in range(200):
                tensor = torch.full((64 * 1024 + 1024 * ((seed + step) % 7),), float(seed))
                if tensor.sum().item() != seed * tensor.numel():
                    errors.append((seed, step))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and cache()["in_use"] == 0 and cache()["reused"] > 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_allocates_from_the_cache(cache):
    keep = torch.ones(MiB // 4)
    pid = os.fork()
    if pid == 0:  # the child: allocate and free through the inherited cache (no OpenMP: not safe after fork)
        first = torch.empty(MiB // 2)
        del first
        second = torch.empty(MiB // 2)
        os._exit(0 if keep[-1].item() == 1.0 and second.numel() == MiB // 2 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
