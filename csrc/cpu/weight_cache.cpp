#include "weight_cache.h"

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <list>
#include <mutex>
#include <vector>

namespace pydecouple {
namespace cpu {
namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* storage_key;
  int64_t offset;
  std::vector<int64_t> sizes, strides;
  at::ScalarType src_dtype, dtype;
  uint32_t version;
  at::Tensor packed;
};

// A short LRU list: a network has tens of layers; the bound keeps a training
// loop (a new version every step) from growing the cache.
constexpr size_t kMaxEntries = 256;

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}

std::list<Entry>& cache() {
  static std::list<Entry> c;
  return c;
}

at::Tensor pack(const at::Tensor& w, at::ScalarType dtype) {
  // (O, C, KH, KW) -> [KK][C][Op], Op = O rounded up to 16 with zero filters,
  // so that every 16-filter vector load stays inside a row.
  const int64_t O = w.size(0), C = w.size(1), KK = w.size(2) * w.size(3), Op = (O + 15) / 16 * 16;
  at::Tensor p = at::zeros({KK, C, Op}, w.options().dtype(dtype));
  p.narrow(2, 0, O).copy_(w.permute({2, 3, 1, 0}).reshape({KK, C, O}));
  return p;
}

}  // namespace

at::Tensor packed_weight(const at::Tensor& w, at::ScalarType dtype) {
  // Inference tensors have no version counter: a change could not be seen.
  if (w.is_inference() || !w.has_storage()) return pack(w, dtype);
  const c10::StorageImpl* key = w.storage().unsafeGetStorageImpl();
  const uint32_t version = w._version();
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    auto& c = cache();
    for (auto it = c.begin(); it != c.end();) {
      auto alive = it->storage.lock();
      if (!alive) {
        it = c.erase(it);  // the weight is gone: its entry can never match again
        continue;
      }
      if (it->storage_key == key && it->offset == w.storage_offset() && it->sizes == w.sizes().vec() &&
          it->strides == w.strides().vec() && it->src_dtype == w.scalar_type() && it->dtype == dtype) {
        if (it->version == version) {
          c.splice(c.begin(), c, it);
          return c.front().packed;
        }
        it = c.erase(it);  // changed in place since it was packed
        continue;
      }
      ++it;
    }
  }
  at::Tensor packed = pack(w, dtype);
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto& c = cache();
  c.push_front(Entry{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()), key,
                     w.storage_offset(), w.sizes().vec(), w.strides().vec(), w.scalar_type(), dtype, version, packed});
  while (c.size() > kMaxEntries) c.pop_back();
  return packed;
}

int64_t packed_weight_cache_size() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return static_cast<int64_t>(cache().size());
}

}  // namespace cpu
}  // namespace pydecouple
