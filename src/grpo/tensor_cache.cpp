// A caching CPU allocator for torch tensors, installed by grpo.allocator while a CPU run trains.
//
// Why: a training step allocates and frees the same large tensors every step (activations, the LM head's
// logits, gradients, AdamW's temporaries). glibc either gives them back to the system, so every step touches
// fresh pages (a page fault per 4 KiB), or, told to keep them, holds them in one heap where blocks that live
// long (a checkpointed layer's input, a gradient) split the freed space into holes: on SmolLM2-135M about 500
// MiB of a 3.4 GB peak RSS was freed memory glibc could neither reuse nor return.
//
// What: tensors of at least `threshold` bytes get their own anonymous mapping, rounded up to a size class
// (1/8 of the power of two below it, at least a page, so at most 12.5% over). A freed block is kept idle for
// reuse by a later tensor of the same class, or resized (mremap, its touched pages kept) for one within a factor
// 2 of it, so steady steps touch few new pages; but only while the memory mapped stays within `slack` of the
// high-water mark of memory in use: before a block would pass that bound, the least recently freed idle blocks
// are unmapped. Peak RSS is therefore the peak of what tensors really use plus `slack`, with no holes. Smaller
// tensors go to c10's own allocation (posix_memalign), as before.
//
// Blocks outlive the installation: one freed after `grpo_tensor_cache_uninstall` is unmapped at once.
// Not reported to torch's memory profiler (profile_memory), which the default CPU allocator feeds.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // mremap
#endif
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kPage = 4096;

struct Block {
  void* data;
  size_t size;
};

size_t size_class(size_t bytes) {
  size_t power = 1;
  while (power * 2 <= bytes) power *= 2;
  size_t step = std::max(power / 8, kPage);
  return (bytes + step - 1) / step * step;
}

struct TensorCache final : c10::Allocator {
  std::mutex mutex;
  bool active = false;
  size_t threshold = 0, slack = 0;  // set by grpo_tensor_cache_install, before `active`
  c10::Allocator* previous = nullptr;
  std::unordered_map<void*, size_t> live;          // block -> its mapped size
  std::list<Block> idle;                           // least recently freed first
  std::multimap<size_t, std::list<Block>::iterator> idle_by_size;
  size_t live_bytes = 0, idle_bytes = 0, high_water = 0, reused = 0, mapped_fresh = 0, unmapped = 0;

  void unmap_oldest_idle() {
    Block block = idle.front();
    auto range = idle_by_size.equal_range(block.size);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == idle.begin()) {
        forget_idle(it);
        break;
      }
    }
    munmap(block.data, block.size);
    ++unmapped;
  }

  void forget_idle(std::multimap<size_t, std::list<Block>::iterator>::iterator entry) {
    idle_bytes -= entry->first;
    idle.erase(entry->second);
    idle_by_size.erase(entry);
  }

  // An idle block within a factor 2 of `size`, the nearest larger one first, else idle_by_size.end().
  std::multimap<size_t, std::list<Block>::iterator>::iterator nearest_idle(size_t size) {
    auto larger = idle_by_size.lower_bound(size);
    if (larger != idle_by_size.end() && larger->first <= 2 * size) return larger;
    if (larger != idle_by_size.begin() && std::prev(larger)->first * 2 >= size) return std::prev(larger);
    return idle_by_size.end();
  }

  void* take(size_t size) {  // under the lock
    auto nearest = nearest_idle(size);
    if (nearest != idle_by_size.end() && nearest->first == size) {
      void* data = nearest->second->data;
      forget_idle(nearest);
      ++reused;
      return data;
    }
    Block resized{nullptr, 0};
    if (nearest != idle_by_size.end()) {  // resized in place of a fresh mapping: its touched pages are kept
      resized = *nearest->second;
      forget_idle(nearest);
    }
    high_water = std::max(high_water, live_bytes + size);
    while (!idle.empty() && live_bytes + idle_bytes + std::max(size, resized.size) > high_water + slack) {
      unmap_oldest_idle();
    }
    if (resized.data != nullptr) {
      void* data = mremap(resized.data, resized.size, size, MREMAP_MAYMOVE);
      if (data != MAP_FAILED) {
        ++reused;
        return data;
      }
      munmap(resized.data, resized.size);
    }
    void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    while (data == MAP_FAILED && !idle.empty()) {  // out of address space or mappings: give idle blocks back
      unmap_oldest_idle();
      data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (data == MAP_FAILED) return nullptr;
    ++mapped_fresh;
    return data;
  }

  c10::DataPtr allocate(size_t bytes) override {
    void* data = nullptr;
    if (bytes >= threshold) {
      size_t size = size_class(bytes);
      std::lock_guard<std::mutex> lock(mutex);
      if (active && (data = take(size)) != nullptr) {
        live.emplace(data, size);
        live_bytes += size;
        return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
    // small, or no mapping to be had (c10 reports OOM): freed by c10 directly, without the lock
    data = c10::alloc_cpu(bytes);
    return {data, data, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
  }

  void free_block(void* data) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto found = live.find(data);
      if (found != live.end()) {
        size_t size = found->second;
        live.erase(found);
        live_bytes -= size;
        if (!active) {
          munmap(data, size);
          return;
        }
        idle.push_back({data, size});
        idle_by_size.emplace(size, std::prev(idle.end()));
        idle_bytes += size;
        return;
      }
    }
    c10::free_cpu(data);
  }

  static void release(void* data);
  c10::DeleterFnPtr raw_deleter() const override { return &release; }  // any block: looks it up
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

TensorCache* cache();
// fork() while another thread holds the lock would leave the child's copy locked for good
void lock_before_fork() { cache()->mutex.lock(); }
void unlock_after_fork() { cache()->mutex.unlock(); }

TensorCache* cache() {
  static TensorCache* instance = [] {  // never destroyed: tensors may be freed during interpreter exit
    auto* created = new TensorCache();
    pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
    return created;
  }();
  return instance;
}

void TensorCache::release(void* data) {
  if (data != nullptr) cache()->free_block(data);
}

}  // namespace

extern "C" {

// Installs the cache as torch's CPU allocator; 1 if it is now in place, 0 where another allocator than c10's
// default is installed (left alone).
int grpo_tensor_cache_install(long threshold, long slack) {
  TensorCache* self = cache();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != self && current != c10::GetDefaultCPUAllocator()) return 0;
  {
    std::lock_guard<std::mutex> lock(self->mutex);
    self->threshold = static_cast<size_t>(threshold);
    self->slack = static_cast<size_t>(slack);
    self->high_water = self->live_bytes;
    self->active = true;
  }
  if (current != self) self->previous = current;
  c10::SetCPUAllocator(self, 0);
  return c10::GetCPUAllocator() == self;
}

// Puts the previous allocator back and unmaps the idle blocks; blocks still in use are unmapped when freed.
void grpo_tensor_cache_uninstall() {
  TensorCache* self = cache();
  if (c10::GetCPUAllocator() == self && self->previous != nullptr) c10::SetCPUAllocator(self->previous, 0);
  std::lock_guard<std::mutex> lock(self->mutex);
  self->active = false;
  while (!self->idle.empty()) self->unmap_oldest_idle();
}

// Bytes in use, bytes idle, high-water mark of bytes in use; blocks reused, freshly mapped, unmapped.
void grpo_tensor_cache_stats(long* out) {
  TensorCache* self = cache();
  std::lock_guard<std::mutex> lock(self->mutex);
  out[0] = self->live_bytes;
  out[1] = self->idle_bytes;
  out[2] = self->high_water;
  out[3] = self->reused;
  out[4] = self->mapped_fresh;
  out[5] = self->unmapped;
}
}
