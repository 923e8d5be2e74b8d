// TT-Rec row reconstruction on the CPU: the rows of a tensor train and the dense gradients of its cores.
// The contract is plugins/tt/reference.py: core k (0-based) is G_k [p_k, r_k, q_k, r_{k+1}] with
// r_0 = r_N = 1; id x has the mixed-radix digits (i_0, ..., i_{N-1}) over (p_0, ..., p_{N-1}) (the first digit
// unreduced) and its row [d = q_0 ... q_{N-1}] is the product of the slices G_k[i_k] [r_k, q_k r_{k+1}].
//
// The left partial products L_k = G_0[i_0] ... G_k[i_k] are [q_0 ... q_k, r_{k+1}] row-major, so each step is
// one small GEMM: L_k = L_{k-1} [Q, r_k] x G_k[i_k] [r_k, q_k r_{k+1}] (read as [Q q_k, r_{k+1}]), and the row
// is L_{N-1}. The backward runs that chain in reverse from dL_{N-1} = grad row (the right partial products
// contracted with the gradient, TT-Rec's scheme without materialising them):
//
//   dG_k[i_k] += L_{k-1}^T dL_k      dL_{k-1} = dL_k G_k[i_k]^T      dG_0[i_0] += dL_0
//
// L_k depends on the prefix (i_0, ..., i_k) only, and dG_j, dL_j (j < k) on dL_k only linearly, so the ids are
// visited in increasing order (sorted when they are not already) and both are shared by consecutive ids: L_k
// is computed once per distinct prefix, and the dL_k of the ids sharing a prefix are summed before they are
// propagated (a batch of 80k random ids of 4M rows with 159^3 digits has ~3 ids per (i_0, i_1) prefix).
// G_k^T is read from a per-call transposed copy of the core, so every GEMM streams contiguous rows.
//
// Ids are split into at most one chunk per thread; each chunk scatters into its own dense gradient buffers
// (chunk 0 into the outputs), which are then summed in a fixed order: no update is lost, no atomics are
// needed, and the result does not depend on the scheduling.
//
// The pooled variants read bags (offsets [B + 1], optional per-id scales: weight, / bag length for MEAN): the
// forward adds each id's scaled row into its bag's output row (each chunk into its own [B, d] buffer, summed
// the same way) or, with about one id per bag, contracts the rows into a [U, d] block and sums the bags from it;
// the backward reads dL_{N-1} of an id as its scale times its bag's gradient row, never forming the rows'
// [U, d] gradient.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "bags.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace {

// SIMD vectors of 8 and 4 floats (GCC / Clang vector extensions: AVX, SSE or NEON code for -march=native).
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));

// V (Vec8, Vec4 or float) from / to any float address (memcpy: unaligned vector moves, no aliasing issue).
template <class V>
inline V load(const float* from) {
  V out;
  std::memcpy(&out, from, sizeof(V));
  return out;
}

template <class V>
inline void store(float* to, V value) {
  std::memcpy(to, &value, sizeof(V));
}

// C[i, j] (= or +=) sum_k A[i am + k ak] B[k ldb + j] for i < MR, j < NV lanes(V) (V: Vec8, Vec4 or float):
// one register tile of MR x NV accumulators.
template <int MR, int NV, class V>
__attribute__((always_inline)) inline void tile(int64_t depth, const float* a, int64_t am, int64_t ak,
                                                const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      acc[i][v] = accumulate ? load<V>(c + i * ldc + v * kLanes) : V{};
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    V row[NV];
    for (int v = 0; v < NV; ++v) {
      row[v] = load<V>(b + k * ldb + v * kLanes);
    }
    for (int i = 0; i < MR; ++i) {
      const float scale = a[i * am + k * ak];
      for (int v = 0; v < NV; ++v) {
        acc[i][v] += scale * row[v];
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      store<V>(c + i * ldc + v * kLanes, acc[i][v]);
    }
  }
}

// MR rows of C: 16 columns at a time, then 8, 4 and 1.
template <int MR>
inline void tile_row(int64_t cols, int64_t depth, const float* a, int64_t am, int64_t ak, const float* b,
                     int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 16 <= cols; j += 16) {
    tile<MR, 2, Vec8>(depth, a, am, ak, b + j, ldb, c + j, ldc, accumulate);
  }
  if (j + 8 <= cols) {
    tile<MR, 1, Vec8>(depth, a, am, ak, b + j, ldb, c + j, ldc, accumulate);
    j += 8;
  }
  if (j + 4 <= cols) {
    tile<MR, 1, Vec4>(depth, a, am, ak, b + j, ldb, c + j, ldc, accumulate);
    j += 4;
  }
  for (; j < cols; ++j) {
    tile<MR, 1, float>(depth, a, am, ak, b + j, ldb, c + j, ldc, accumulate);
  }
}

// The rows of C in tiles of MR rows, then of MR / 2, ... for the rest.
template <int MR>
void tile_rows(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t am, int64_t ak, const float* b,
               int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t i = 0;
  for (; i + MR <= rows; i += MR) {
    tile_row<MR>(cols, depth, a + i * am, am, ak, b, ldb, c + i * ldc, ldc, accumulate);
  }
  if constexpr (MR > 1) {
    tile_rows<MR / 2>(rows - i, cols, depth, a + i * am, am, ak, b, ldb, c + i * ldc, ldc, accumulate);
  }
}

// C [rows, cols] (row stride ldc) = or += A B, with A [rows, depth] read as A[i am + k ak] (any layout, so A^T
// is free) and B [depth, cols] (row stride ldb). Tiles of 4 rows (2 x 4 vectors of accumulators), of 8 rows
// when C has at most 8 columns (8 accumulators in flight either way).
void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t am, int64_t ak, const float* b,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if (cols <= 8) {
    tile_rows<8>(rows, cols, depth, a, am, ak, b, ldb, c, ldc, accumulate);
  } else {
    tile_rows<4>(rows, cols, depth, a, am, ak, b, ldb, c, ldc, accumulate);
  }
}

// Prefetches the cache lines of row[0 : len) for reading (kWrite = 0) or writing (kWrite = 1).
template <int kWrite>
inline void prefetch_row(const float* row, int64_t len) {
  for (int64_t e = 0; e < len; e += 16) {
    __builtin_prefetch(row + e, kWrite, 3);
  }
  __builtin_prefetch(row + len - 1, kWrite, 3);
}

constexpr int64_t kAhead = 4;  // ids between a row's prefetch and its use

// a * b, or `fallback` when it overflows int64.
int64_t product_or(int64_t a, int64_t b, int64_t fallback) {
  int64_t out = 0;
  return __builtin_mul_overflow(a, b, &out) ? fallback : out;
}

// The checked cores of one tensor train and their derived sizes.
struct Train {
  int64_t n;
  std::vector<at::Tensor> cores;  // contiguous float32
  std::vector<const float*> data;
  std::vector<int64_t> p, q, r;   // r has n + 1 entries
  std::vector<int64_t> width;     // width[k] = q_0 ... q_k
  std::vector<int64_t> slice;     // r_k q_k r_{k+1}: elements of one slice of core k
  int64_t dim = 1;
  int64_t limit = 1;              // ids must be < limit = p_0 ... p_{N-1} (int64 max when that overflows)
  int64_t flops = 0;              // multiply-adds of one forward row

  explicit Train(const std::vector<at::Tensor>& input) : n(static_cast<int64_t>(input.size())) {
    TORCH_CHECK(n >= 2, "tt: need at least 2 cores, got ", n);
    r.push_back(1);
    for (int64_t k = 0; k < n; ++k) {
      const at::Tensor& core = input[k];
      TORCH_CHECK(core.device().is_cpu() && core.scalar_type() == at::kFloat,
                  "tt: cores must be float32 CPU tensors, core ", k, " is ", core.scalar_type(), " on ",
                  core.device());
      TORCH_CHECK(core.dim() == 4, "tt: core ", k, " must be 4-D [p, R_in, q, R_out], got ", core.sizes());
      TORCH_CHECK(core.size(0) >= 1 && core.size(1) >= 1 && core.size(2) >= 1 && core.size(3) >= 1,
                  "tt: core ", k, " has an empty dimension: ", core.sizes());
      TORCH_CHECK(core.size(1) == r.back(), "tt: core ", k, " has R_in = ", core.size(1), " but the previous core's",
                  " R_out (1 for the first core) is ", r.back());
      cores.push_back(core.contiguous());
      data.push_back(cores.back().data_ptr<float>());
      p.push_back(core.size(0));
      q.push_back(core.size(2));
      r.push_back(core.size(3));
      slice.push_back(core.size(1) * core.size(2) * core.size(3));
      dim *= q.back();
      width.push_back(dim);
    }
    TORCH_CHECK(r.back() == 1, "tt: the last core must have R_out = 1, got ", r.back());
    constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
    for (int64_t k = 0; k < n; ++k) {
      limit = product_or(limit, p[k], kMax);
    }
    for (int64_t k = 1; k < n; ++k) {
      flops += width[k - 1] * slice[k];
    }
  }

  // The digits (i_0, ..., i_{N-1}) of id x (0 <= x < limit).
  void digits(int64_t x, int64_t* out) const {
    for (int64_t k = n - 1; k >= 1; --k) {
      out[k] = x % p[k];
      x /= p[k];
    }
    out[0] = x;
  }

  // Slice i of core k: [r_k, q_k r_{k+1}].
  const float* at(int64_t k, int64_t i) const { return data[k] + i * slice[k]; }

  // Floats of L_k [width_k, r_{k+1}] (so also of dL_k).
  int64_t left_size(int64_t k) const { return width[k] * r[k + 1]; }
};

// The checked ids of one call, the digits of each (row-major [U, N]) and the positions in increasing id order.
struct Batch {
  int64_t count;
  std::vector<int64_t> digit;
  std::vector<int64_t> order;

  Batch(const at::Tensor& ids, const Train& train) {
    TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 1 && !at::isFloatingType(ids.scalar_type()) &&
                    !at::isComplexType(ids.scalar_type()) && ids.scalar_type() != at::kBool,
                "tt: ids must be a 1-D integer CPU tensor, got ", ids.scalar_type(), " ", ids.sizes(), " on ",
                ids.device());
    const auto x = ids.to(at::kLong).contiguous();
    const int64_t* id = x.data_ptr<int64_t>();
    count = x.numel();
    for (int64_t u = 0; u < count; ++u) {
      TORCH_CHECK(id[u] >= 0 && id[u] < train.limit, "tt: id ", id[u], " (position ", u, ") is outside [0, ",
                  train.limit, ") (the product of the cores' p)");
    }
    const int64_t n = train.n;
    digit.resize(count * n);
    at::parallel_for(0, count, 1 << 12, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        train.digits(id[u], digit.data() + u * n);
      }
    });
    order = increasing_order(id, count);
  }

  // The positions of id[0 : count) (all >= 0) in increasing id order, equal ids in position order: an LSD radix
  // sort over the ids' significant bits, 11 at a time (a comparison sort of the positions took ~7 ms for 80k
  // random ids of 256M rows, twice per training step).
  static std::vector<int64_t> increasing_order(const int64_t* id, int64_t count) {
    std::vector<int64_t> order(count);
    std::iota(order.begin(), order.end(), int64_t{0});
    if (std::is_sorted(id, id + count)) {
      return order;
    }
    constexpr int kBits = 11;
    constexpr int64_t kBuckets = int64_t{1} << kBits;
    const auto largest = static_cast<uint64_t>(*std::max_element(id, id + count));
    const int bits = 64 - __builtin_clzll(largest | 1);
    std::vector<int64_t> next(count), counts(kBuckets + 1);
    for (int shift = 0; shift < bits; shift += kBits) {
      std::fill(counts.begin(), counts.end(), 0);
      for (const int64_t u : order) {
        ++counts[((static_cast<uint64_t>(id[u]) >> shift) & (kBuckets - 1)) + 1];
      }
      std::partial_sum(counts.begin(), counts.end(), counts.begin());
      for (const int64_t u : order) {
        next[counts[(static_cast<uint64_t>(id[u]) >> shift) & (kBuckets - 1)]++] = u;
      }
      order.swap(next);
    }
    return order;
  }

  const int64_t* digits_of(int64_t u, int64_t n) const { return digit.data() + u * n; }
};

// Visits ids in increasing order and keeps the left products of the current id's prefixes, recomputing L_k
// only when digit k or an earlier one changes.
class Walker {
 public:
  explicit Walker(const Train& train) : train_(train), chain_(train.n), previous_(train.n) {
    for (int64_t k = 1; k + 1 < train.n; ++k) {
      storage_.emplace_back(train.left_size(k));
    }
  }

  // L_k of the current prefix (k < N - 1).
  const float* left(int64_t k) const { return chain_[k]; }

  // For the ids at positions order[j0, j1): close(k, digits) for every level k < N - 1 whose prefix group
  // ends (deepest first; `digits` those of the group's last id, L_{k-1} still its own), then leaf(u, digits)
  // with every L_k (k < N - 1) of id u's prefixes.
  template <class Close, class Leaf>
  void walk(const Batch& batch, int64_t j0, int64_t j1, Close&& close, Leaf&& leaf) {
    const int64_t n = train_.n;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t u = batch.order[j];
      const int64_t* digit = batch.digits_of(u, n);
      int64_t level = 0;  // the first digit that differs from the previous id's
      if (j > j0) {
        while (level < n - 1 && digit[level] == previous_[level]) {
          ++level;
        }
        for (int64_t k = n - 2; k >= level; --k) {
          close(k, previous_.data());
        }
      }
      for (int64_t k = level; k < n - 1; ++k) {
        open(k, digit[k]);
      }
      leaf(u, digit);
      std::copy_n(digit, n, previous_.begin());
    }
    if (j1 > j0) {
      for (int64_t k = n - 2; k >= 0; --k) {
        close(k, previous_.data());
      }
    }
  }

 private:
  // L_k = L_{k-1} G_k[i]  (L_0 = G_0[i]).
  void open(int64_t k, int64_t i) {
    if (k == 0) {
      chain_[0] = train_.at(0, i);
      return;
    }
    const int64_t cols = train_.q[k] * train_.r[k + 1];
    float* out = storage_[k - 1].data();
    gemm(train_.width[k - 1], cols, train_.r[k], chain_[k - 1], train_.r[k], 1, train_.at(k, i), cols, out, cols,
         false);
    chain_[k] = out;
  }

  const Train& train_;
  std::vector<std::vector<float>> storage_;  // L_1 .. L_{N-2}
  std::vector<const float*> chain_;          // L_0 .. L_{N-2}
  std::vector<int64_t> previous_;            // the digits of the last id visited
};

// The backward of one chunk of ids: scatters dG_k into `grads[k]` and keeps dL_k summed over the ids of the
// current prefix group of level k.
class Scatter {
 public:
  Scatter(const Train& train, const std::vector<const float*>& transposed, const std::vector<int64_t>& padded,
          std::vector<float*> grads)
      : train_(train), transposed_(transposed), padded_(padded), grads_(std::move(grads)), walker_(train) {
    for (int64_t k = 0; k + 1 < train.n; ++k) {
      sums_.emplace_back(train.left_size(k), 0.0f);
    }
    int64_t wide = 0;
    for (int64_t k = 1; k < train.n; ++k) {
      wide = std::max(wide, train.width[k - 1] * padded[k]);
    }
    wide_.resize(wide);
  }

  // Scatters the gradients of the ids at positions order[j0, j1); `rows` gives the gradient dL_{N-1} [d] of the
  // row of id u (rows.row(u)) and where it is read from (rows.address(u), to prefetch).
  template <class Rows>
  void run(const Batch& batch, Rows& rows, int64_t j0, int64_t j1) {
    const int64_t n = train_.n, dim = train_.dim;
    int64_t j = j0;  // the position of the leaf's id
    walker_.walk(
        batch, j0, j1,
        [&](int64_t k, const int64_t* digit) {
          float* sum = sums_[k].data();
          if (k == 0) {
            float* slice = grads_[0] + digit[0] * train_.slice[0];
            for (int64_t e = 0; e < train_.slice[0]; ++e) {
              slice[e] += sum[e];
            }
          } else {
            propagate(k, digit[k], sum);
          }
          std::fill(sums_[k].begin(), sums_[k].end(), 0.0f);
        },
        [&](int64_t u, const int64_t* digit) {
          if (j + kAhead < j1) {
            prefetch_row<0>(rows.address(batch.order[j + kAhead]), dim);
          }
          ++j;
          propagate(n - 1, digit[n - 1], rows.row(u));
        });
  }

 private:
  // dG_k[i] += L_{k-1}^T dL_k and sum_{k-1} += dL_k G_k[i]^T for dL_k [width_{k-1}, q_k r_{k+1}] (k >= 1).
  void propagate(int64_t k, int64_t i, const float* d_left) {
    const int64_t rows = train_.width[k - 1], rank = train_.r[k], cols = train_.q[k] * train_.r[k + 1];
    const float* left = walker_.left(k - 1);
    gemm(rank, cols, rows, left, 1, rank, d_left, cols, grads_[k] + i * train_.slice[k], cols, true);
    const int64_t pad = padded_[k];
    float* sum = sums_[k - 1].data();
    const float* transposed = transposed_[k] + i * cols * pad;
    if (pad == rank) {
      gemm(rows, rank, cols, d_left, cols, 1, transposed, pad, sum, rank, true);
      return;
    }
    gemm(rows, pad, cols, d_left, cols, 1, transposed, pad, wide_.data(), pad, false);
    for (int64_t l = 0; l < rows; ++l) {
      for (int64_t a = 0; a < rank; ++a) {
        sum[l * rank + a] += wide_[l * pad + a];
      }
    }
  }

  const Train& train_;
  const std::vector<const float*>& transposed_;
  const std::vector<int64_t>& padded_;
  std::vector<float*> grads_;
  Walker walker_;
  std::vector<std::vector<float>> sums_;  // dL_0 .. dL_{N-2} summed over the current prefix groups
  std::vector<float> wide_;               // dL_{k-1} with rows padded to r8_k
};

// The gradient of each id's row: row u of a [U, d] gradient.
struct RowGrads {
  const float* grad;
  int64_t dim;

  const float* address(int64_t u) const { return grad + u * dim; }
  const float* row(int64_t u) const { return address(u); }
};

// The gradient of each id's row from its bag's: scale_u times row bag_u of a [B, d] gradient.
struct BagGrads {
  const torchrec_pss::GradRows& grad;
  const torchrec_pss::Bags& bags;
  const std::vector<int64_t>& bag;
  std::vector<float> scaled;

  const float* address(int64_t u) const { return grad.row(bag[u]); }
  const float* row(int64_t u) {
    const float* source = address(u);
    if (bags.weights == nullptr) {
      return source;
    }
    const float scale = bags.weights[u];
    for (size_t k = 0; k < scaled.size(); ++k) {
      scaled[k] = scale * source[k];
    }
    return scaled.data();
  }
};

// The bag of every id [U] (offsets checked by Bags).
std::vector<int64_t> bag_of_ids(const torchrec_pss::Bags& bags) {
  std::vector<int64_t> bag(bags.num_ids);
  for (int64_t b = 0; b < bags.num_bags; ++b) {
    std::fill(bag.begin() + bags.offsets[b], bag.begin() + bags.offsets[b + 1], b);
  }
  return bag;
}

// Sums chunks' private buffers (floats [offset, offset + size) of each) into out, in chunk order.
void add_buffers(float* out, const std::vector<std::vector<float>>& buffers, int64_t offset, int64_t size) {
  at::parallel_for(0, size, 1 << 14, [&](int64_t e0, int64_t e1) {
    for (size_t c = 1; c < buffers.size(); ++c) {
      const float* part = buffers[c].data() + offset;
      for (int64_t e = e0; e < e1; ++e) {
        out[e] += part[e];
      }
    }
  });
}

// Chunks of ids for `work` (multiply-adds, weighted) whose private buffers hold `floats` each: one per thread,
// fewer when zeroing and summing the buffers would cost more than the ids (under 4 units of work per float).
int64_t chunk_count(int64_t work, int64_t floats) {
  return std::clamp<int64_t>(work / (4 * std::max<int64_t>(floats, 1)), 1, at::get_num_threads());
}

// The dense gradients of the cores, the gradient of id u's row given by make_rows() (RowGrads or BagGrads).
template <class MakeRows>
std::vector<at::Tensor> core_gradients(const Train& train, const Batch& batch, MakeRows&& make_rows) {
  const int64_t count = batch.count, n = train.n;
  std::vector<at::Tensor> out;
  std::vector<int64_t> offset{0};  // core k's gradient is floats [offset[k], offset[k + 1]) of a chunk buffer
  for (int64_t k = 0; k < n; ++k) {
    out.push_back(at::zeros_like(train.cores[k]));
    offset.push_back(offset.back() + train.cores[k].numel());
  }
  if (count == 0) {
    return out;
  }
  // G_k^T per slice, its rows padded with zeros to r8_k, a multiple of 8 (no narrow tiles): [p_k, q_k r_{k+1}, r8_k].
  std::vector<at::Tensor> transposed(n);
  std::vector<const float*> transposed_data(n);
  std::vector<int64_t> padded(n);
  for (int64_t k = 1; k < n; ++k) {
    const at::Tensor& core = train.cores[k];
    padded[k] = (train.r[k] + 7) / 8 * 8;
    transposed[k] = at::zeros({train.p[k], train.q[k] * train.r[k + 1], padded[k]}, core.options());
    transposed[k].narrow(2, 0, train.r[k]).copy_(core.permute({0, 2, 3, 1}).reshape({train.p[k], -1, train.r[k]}));
    transposed_data[k] = transposed[k].data_ptr<float>();
  }
  const int64_t total = offset.back();
  const int64_t chunks = chunk_count(count * std::max<int64_t>(train.flops, 1) / 4, total);
  std::vector<std::vector<float>> buffers(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<float*> grads(n);
      if (c > 0) {
        buffers[c].assign(total, 0.0f);
      }
      for (int64_t k = 0; k < n; ++k) {
        grads[k] = c == 0 ? out[k].data_ptr<float>() : buffers[c].data() + offset[k];
      }
      auto rows = make_rows();
      Scatter(train, transposed_data, padded, std::move(grads)).run(batch, rows, count * c / chunks,
                                                                     count * (c + 1) / chunks);
    }
  });
  if (chunks > 1) {
    for (int64_t k = 0; k < n; ++k) {
      add_buffers(out[k].data_ptr<float>(), buffers, offset[k], offset[k + 1] - offset[k]);
    }
  }
  return out;
}

// dst[0 : dim) += scale * row[0 : dim).
inline void add_scaled(float* __restrict__ dst, const float* __restrict__ row, float scale, int64_t dim) {
  for (int64_t k = 0; k < dim; ++k) {
    dst[k] += scale * row[k];
  }
}

// Row u of every id u into rows [U, d] (each id its own slot: no conflicts between threads).
void contract_rows(const Train& train, const Batch& batch, float* rows) {
  const int64_t count = batch.count, dim = train.dim, n = train.n;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(train.flops, 1));
  at::parallel_for(0, count, grain, [&](int64_t j0, int64_t j1) {
    Walker walker(train);
    const int64_t last = n - 1, q = train.q[last], rank = train.r[last], rows_in = train.width[last - 1];
    int64_t j = j0;  // the position of the leaf's id
    walker.walk(
        batch, j0, j1, [](int64_t, const int64_t*) {},
        [&](int64_t u, const int64_t* digit) {
          if (j + kAhead < j1) {
            prefetch_row<1>(rows + batch.order[j + kAhead] * dim, dim);
          }
          ++j;
          gemm(rows_in, q, rank, walker.left(last - 1), rank, 1, train.at(last, digit[last]), q, rows + u * dim, q,
               false);
        });
  });
}

}  // namespace

at::Tensor tt_rows_forward(const std::vector<at::Tensor>& cores, const at::Tensor& ids) {
  const Train train(cores);
  const Batch batch(ids, train);
  auto out = at::empty({batch.count, train.dim}, train.cores[0].options());
  contract_rows(train, batch, out.data_ptr<float>());
  return out;
}

std::vector<at::Tensor> tt_rows_backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& cores,
                                         const at::Tensor& ids) {
  const Train train(cores);
  const Batch batch(ids, train);
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == at::kFloat,
              "tt: grad must be a float32 CPU tensor, got ", grad_out.scalar_type(), " on ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == batch.count && grad_out.size(1) == train.dim,
              "tt: grad must be [U, d] = [", batch.count, ", ", train.dim, "], got ", grad_out.sizes());
  const auto grad = grad_out.contiguous();
  return core_gradients(train, batch, [&] { return RowGrads{grad.data_ptr<float>(), train.dim}; });
}

at::Tensor tt_pooled_forward(const std::vector<at::Tensor>& cores, const at::Tensor& ids, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& scales) {
  const Train train(cores);
  const Batch batch(ids, train);
  const torchrec_pss::Bags bags(ids, offsets, scales);
  const int64_t count = batch.count, dim = train.dim, n = train.n, total = bags.num_bags * dim;
  auto out = at::zeros({bags.num_bags, dim}, train.cores[0].options());
  if (count == 0) {
    return out;
  }
  const int64_t chunks = chunk_count(count * std::max<int64_t>(train.flops, 1), total);
  if (chunks > 1 && count <= (chunks - 1) * bags.num_bags) {
    // Few ids per bag: a [U, d] block of rows costs less than the threads' private [B, d] outputs.
    std::vector<float> rows(count * dim);
    contract_rows(train, batch, rows.data());
    float* pooled = out.data_ptr<float>();
    at::parallel_for(0, bags.num_bags, torchrec_pss::bag_grain(bags, dim), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t u = bags.offsets[b]; u < bags.offsets[b + 1]; ++u) {
          add_scaled(pooled + b * dim, rows.data() + u * dim, bags.weight(u), dim);
        }
      }
    });
    return out;
  }
  const std::vector<int64_t> bag = bag_of_ids(bags);
  std::vector<std::vector<float>> buffers(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* sink = out.data_ptr<float>();
      if (c > 0) {
        buffers[c].assign(total, 0.0f);
        sink = buffers[c].data();
      }
      Walker walker(train);
      std::vector<float> row(dim);
      const int64_t last = n - 1, q = train.q[last], rank = train.r[last], rows_in = train.width[last - 1];
      walker.walk(
          batch, count * c / chunks, count * (c + 1) / chunks, [](int64_t, const int64_t*) {},
          [&](int64_t u, const int64_t* digit) {
            gemm(rows_in, q, rank, walker.left(last - 1), rank, 1, train.at(last, digit[last]), q, row.data(), q,
                 false);
            add_scaled(sink + bag[u] * dim, row.data(), bags.weight(u), dim);
          });
    }
  });
  if (chunks > 1) {
    add_buffers(out.data_ptr<float>(), buffers, 0, total);
  }
  return out;
}

std::vector<at::Tensor> tt_pooled_backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& cores,
                                           const at::Tensor& ids, const at::Tensor& offsets,
                                           const std::optional<at::Tensor>& scales) {
  const Train train(cores);
  const Batch batch(ids, train);
  const torchrec_pss::Bags bags(ids, offsets, scales);
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.dim() == 2 && grad_out.size(0) == bags.num_bags &&
                  grad_out.size(1) == train.dim,
              "tt: grad must be a CPU tensor [B, d] = [", bags.num_bags, ", ", train.dim, "], got ", grad_out.sizes(),
              " on ", grad_out.device());
  const auto grad = torchrec_pss::grad_rows(grad_out);
  const std::vector<int64_t> bag = bag_of_ids(bags);
  return core_gradients(train, batch,
                        [&] { return BagGrads{grad, bags, bag, std::vector<float>(train.dim)}; });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  using py::arg;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  module.doc() = "TT-Rec CPU kernels (see torchrec_pss_plugins.tt.cpu_kernels)";
  module.def("tt_rows_forward", &tt_rows_forward, no_gil, "Rows of ids: [U, d]", arg("cores"), arg("ids"));
  module.def("tt_rows_backward", &tt_rows_backward, no_gil, "Dense gradients of the cores (their shapes)",
             arg("grad"), arg("cores"), arg("ids"));
  module.def("tt_pooled_forward", &tt_pooled_forward, no_gil, "Pooled rows of bags: [B, d]", arg("cores"),
             arg("ids"), arg("offsets"), arg("scales"));
  module.def("tt_pooled_backward", &tt_pooled_backward, no_gil,
             "Dense gradients of the cores (their shapes) for the pooled rows' gradient [B, d]", arg("grad"),
             arg("cores"), arg("ids"), arg("offsets"), arg("scales"));
}
