// A set of object addresses by open addressing, for the host path's identity checks (a gradient
// listed twice, a module or parameter met twice in a module tree). Reused across calls, so it
// allocates only when it grows past its largest size so far.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace gradclip {

class PointerSet {
 public:
  // Empties the set, sized for about `expected` insertions (it grows past that if needed).
  void clear(size_t expected) {
    size_t capacity = 16;
    while (capacity < 2 * expected) capacity <<= 1;
    table_.assign(capacity, nullptr);
    size_ = 0;
  }

  // True when `key` was not in the set (it is now).
  bool insert(const void* key) {
    if (2 * (size_ + 1) > table_.size()) grow();
    const size_t mask = table_.size() - 1;
    for (size_t slot = hash(key) & mask;; slot = (slot + 1) & mask) {
      if (table_[slot] == nullptr) {
        table_[slot] = key;
        ++size_;
        return true;
      }
      if (table_[slot] == key) return false;
    }
  }

 private:
  static size_t hash(const void* key) {
    return static_cast<size_t>(((reinterpret_cast<uintptr_t>(key) >> 4) * 0x9E3779B97F4A7C15ull) >> 20);
  }

  void grow() {
    std::vector<const void*> old;
    old.swap(table_);
    clear(old.empty() ? 8 : old.size());
    for (const void* key : old) {
      if (key != nullptr) insert(key);
    }
  }

  std::vector<const void*> table_;
  size_t size_ = 0;
};

}  // namespace gradclip
