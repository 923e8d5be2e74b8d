// ROBE-Z on the CPU: fused hash + gather + pool forward, its backward, and the backward fused with
// SGD / (blockwise) Adagrad. The formulas are the contract of plugins/robe/robe.py's module docstring:
//
//   E_t[x, i] = M[(h(t, k, c) + o) mod |M|] * g(t, x, i)
//   h(t, k, c) = ((A t + B (k mod P) + C c + D) mod P) mod |M|,  P = 2^31 - 1
//   g(t, x, i) = 1 - 2 (((A' t + B' (x mod P) + C' i + D') mod P) mod 2)
//
// Every product is formed from operands already reduced mod P (< 2^62), so any int64 id is exact; the
// mod-P reductions use P's Mersenne form and the mod-|M| one a multiply (no divisions). Each id reads C
// runs of R contiguous (circular) elements: Z <= d gives C = d / Z runs of R = Z, Z > d one run of R = d.
//
// Every function takes `keys`, the table keys t: one (every bag) or one per bag, so that one call can pool the
// bags of several tables sharing M. A Plan hashes every (id, chunk) once per call (in parallel over bags). The
// forward pools bags in parallel, one run of R columns at a time with its accumulators in registers (R a
// compile-time constant for R in {4, ..., 128}), prefetching runs about a bag ahead. The backward scatters run
// by run into memory ranges owned by one thread each (every thread scans all runs and keeps the pieces in its
// range; small batches use fewer threads), so no update is lost and no atomics are needed. Adagrad first sums the batch's gradient
// into a persistent zero scratch of |M| floats, then updates and re-zeroes only the touched blocks.
//
// Short runs (Z < 16, HashedNet's Z = 1 above all) skip the Plan, which would store and reload d / Z starts per id:
// each id is hashed a few ids before its use by a branch-free loop that vectorises, and its runs are prefetched
// then when M does not fit the caches. With a small M the scatter of short runs splits the bags over threads
// instead of M (private copies of M, summed afterwards), as every thread would otherwise hash every id. With AVX-512
// the scatter of runs of one element (HashedNet) adds 16 elements at a time by gather + scatter.

#include <torch/extension.h>

#include "bags.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512CD__)
#include <immintrin.h>
#endif

namespace {

constexpr uint64_t kPrime = (uint64_t{1} << 31) - 1;

// x mod P for any x < 2^64 (2^31 = 1 mod P).
inline uint64_t reduce(uint64_t x) {
  x = (x & kPrime) + (x >> 31);  // < 2^34
  x = (x & kPrime) + (x >> 31);  // < P + 9
  return x >= kPrime ? x - kPrime : x;
}

// x mod P for x < 2^34 (a sum of a few residues): one fold.
inline uint64_t reduce_small(uint64_t x) {
  x = (x & kPrime) + (x >> 31);  // < P + 8
  return x >= kPrime ? x - kPrime : x;
}

// torch.remainder(k, P): in [0, P) for negative k too.
inline uint64_t mod_prime(int64_t k) {
  if (k >= 0) {
    return reduce(static_cast<uint64_t>(k));
  }
  const int64_t r = k % static_cast<int64_t>(kPrime);
  return static_cast<uint64_t>(r < 0 ? r + static_cast<int64_t>(kPrime) : r);
}

// a mod d without a division (Lemire's fastmod, exact for every 32-bit a and d >= 1).
struct FastMod {
  uint64_t magic;
  uint64_t divisor;
  explicit FastMod(uint32_t d) : magic(~uint64_t{0} / d + 1), divisor(d) {}
  uint32_t operator()(uint32_t a) const {
    const uint64_t low = magic * a;
    return static_cast<uint32_t>((static_cast<unsigned __int128>(low) * divisor) >> 64);
  }
};

template <class T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// Runs shorter than this are hashed as they are used (Hasher::short_runs).
constexpr int64_t kShortRun = 16;

// The per-table terms of the two hashes: (A t + D) mod P and (A' t + D') mod P.
struct TableTerms {
  uint64_t loc, sign;
};

// The hash functions of tables of one embedding width, with every per-chunk and per-element term precomputed mod P.
struct Hasher {
  int64_t dim, run, chunks, ids_per_block, m;
  double inv_m;
  bool use_sign;
  uint64_t loc_a, loc_d, loc_b, sign_a, sign_d, sign_b;
  std::vector<uint32_t> loc_c;   // (C c) mod P per chunk
  std::vector<uint32_t> sign_i;  // (C' i) mod P per element
  FastMod mod_m;

  Hasher(const at::Tensor& coefficients, int64_t dim_, int64_t chunk_size, bool use_sign_,
         int64_t memory_size)
      : dim(dim_),
        m(memory_size),
        inv_m(1.0 / static_cast<double>(std::max<int64_t>(memory_size, 1))),
        use_sign(use_sign_),
        mod_m(static_cast<uint32_t>(std::max<int64_t>(memory_size, 1))) {
    TORCH_CHECK(dim > 0 && chunk_size > 0, "dim and chunk_size must be positive");
    TORCH_CHECK(dim % chunk_size == 0 || chunk_size % dim == 0, "chunk_size must divide dim or be a multiple of it");
    TORCH_CHECK(memory_size > 0 && static_cast<uint64_t>(memory_size) <= kPrime,
                "memory size must be in [1, 2^31 - 1]");
    const auto rows = coefficient_rows(coefficients);
    const uint64_t* l = rows.data();
    const uint64_t* s = l + 4;
    run = std::min(chunk_size, dim);
    chunks = dim / run;
    ids_per_block = chunk_size > dim ? chunk_size / dim : 0;
    loc_a = l[0], loc_b = l[1], loc_d = l[3];
    sign_a = s[0], sign_b = s[1], sign_d = s[3];
    for (int64_t c = 0; c < chunks; ++c) {
      loc_c.push_back(static_cast<uint32_t>(reduce(l[2] * static_cast<uint64_t>(c))));
    }
    for (int64_t i = 0; i < dim; ++i) {
      sign_i.push_back(static_cast<uint32_t>(reduce(s[2] * static_cast<uint64_t>(i))));
    }
  }

  // The [2, 4] coefficients (location row, then sign row), each of A, B, C, D reduced mod P.
  static std::array<uint64_t, 8> coefficient_rows(const at::Tensor& coefficients) {
    TORCH_CHECK(coefficients.dim() == 2 && coefficients.size(0) == 2 && coefficients.size(1) == 4,
                "hash coefficients must have shape [2, 4] (location and sign rows of A, B, C, D)");
    const auto host = coefficients.to(at::kCPU, at::kLong).contiguous();
    const int64_t* data = host.data_ptr<int64_t>();
    std::array<uint64_t, 8> rows;
    for (int i = 0; i < 8; ++i) {
      rows[i] = mod_prime(data[i]);
    }
    return rows;
  }

  TableTerms table_terms(int64_t table_key) const {
    const uint64_t t = mod_prime(table_key);
    return {reduce_small(reduce(loc_a * t) + loc_d), reduce_small(reduce(sign_a * t) + sign_d)};
  }

  // Start positions (< |M|) of the `chunks` runs of id x of the table with terms `table`.
  void starts(int64_t x, const TableTerms& table, uint32_t* out) const {
    if (ids_per_block == 0) {
      const uint64_t base = table.loc + reduce(loc_b * mod_prime(x));
      for (int64_t c = 0; c < chunks; ++c) {
        out[c] = mod_m(static_cast<uint32_t>(reduce_small(base + loc_c[c])));
      }
      return;
    }
    int64_t k = x / ids_per_block;  // floor division, as torch.div(rounding_mode="floor")
    if (x % ids_per_block != 0 && x < 0) {
      --k;
    }
    const uint64_t offset = static_cast<uint64_t>(x - k * ids_per_block) * static_cast<uint64_t>(dim);
    const uint64_t block = mod_m(static_cast<uint32_t>(reduce_small(table.loc + reduce(loc_b * mod_prime(k)))));
    out[0] = static_cast<uint32_t>((block + offset) % static_cast<uint64_t>(m));
  }

  // Short runs (Z < kShortRun, Z <= |M| <= 2^30) are hashed per id as they are used (short_starts / sign_masks)
  // instead of through a Plan: a Plan would store and reload d / Z starts per id.
  bool short_runs() const { return ids_per_block == 0 && run < kShortRun && run <= m && m <= (int64_t{1} << 30); }

  // (A t + B (x mod P) + D) mod P: the per-id part of the location hash (Z <= d).
  uint32_t loc_base(int64_t x, const TableTerms& table) const {
    return static_cast<uint32_t>(reduce_small(table.loc + reduce(loc_b * mod_prime(x))));
  }

  // The run starts of the id with location base `base`, as starts() but branch-free so that the loop vectorises:
  // v mod |M| from a truncated double quotient, corrected by one |M| either way (|M| <= 2^30: r fits int32).
  void short_starts(uint32_t base, uint32_t* __restrict__ out) const {
    const uint32_t mm = static_cast<uint32_t>(m);
    const uint32_t* __restrict__ terms = loc_c.data();
    for (int64_t c = 0; c < chunks; ++c) {
      uint32_t v = base + terms[c];  // < 2P < 2^32
      v = std::min(v, v - static_cast<uint32_t>(kPrime));
      const auto q = static_cast<uint32_t>(static_cast<int32_t>(static_cast<double>(static_cast<int32_t>(v)) * inv_m));
      auto r = static_cast<int32_t>(v - q * mm);
      r += r < 0 ? static_cast<int32_t>(mm) : 0;
      r -= r >= static_cast<int32_t>(mm) ? static_cast<int32_t>(mm) : 0;
      out[c] = static_cast<uint32_t>(r);
    }
  }

  // The sign of every element of the id with sign base `base` as a float sign bit (0 or 1 << 31, to xor with).
  void sign_masks(uint32_t base, uint32_t* __restrict__ out) const {
    const uint32_t* __restrict__ terms = sign_i.data();
    for (int64_t i = 0; i < dim; ++i) {
      uint32_t v = base + terms[i];
      v = std::min(v, v - static_cast<uint32_t>(kPrime));
      out[i] = (v & 1u) << 31;
    }
  }

  // (A' t + B' (x mod P) + D') mod P: the per-id part of the sign hash.
  uint32_t sign_base(int64_t x, const TableTerms& table) const {
    return static_cast<uint32_t>(reduce_small(table.sign + reduce(sign_b * mod_prime(x))));
  }

  // The sign (+-1) of element i of the id with sign base `base`.
  float sign(uint32_t base, int64_t i) const {
    uint32_t v = base + sign_i[i];  // < 2P < 2^32
    v = v >= kPrime ? v - static_cast<uint32_t>(kPrime) : v;
    return 1.0f - 2.0f * static_cast<float>(v & 1u);
  }
};

// Calls piece(position, element offset, length) for the contiguous pieces of the circular run
// M[start : start + run]. With kRun > 0 (then kRun == run) a run that does not wrap is one piece whose length
// is a compile-time constant (std::integral_constant), so its loops unroll and vectorise fully.
template <int64_t kRun, class Piece>
inline void for_pieces(int64_t start, int64_t run, int64_t m, Piece&& piece) {
  if constexpr (kRun > 0) {
    if (start + kRun <= m) {
      piece(start, int64_t{0}, std::integral_constant<int64_t, kRun>{});
      return;
    }
  }
  int64_t r = 0;
  int64_t pos = start;
  while (r < run) {
    const int64_t len = std::min(run - r, m - pos);
    piece(pos, r, len);
    r += len;
    pos = 0;
  }
}

// body(std::integral_constant<int64_t, R>{}) when run is one of kRuns, body(integral_constant<0>) otherwise.
template <int64_t... kRuns, class Body>
void dispatch_among(int64_t run, Body&& body) {
  const bool compiled = ((run == kRuns && (body(std::integral_constant<int64_t, kRuns>{}), true)) || ...);
  if (!compiled) {
    body(std::integral_constant<int64_t, 0>{});
  }
}

// The run lengths of the Plan paths with a compiled case.
template <class Body>
void dispatch_run(int64_t run, Body&& body) {
  dispatch_among<4, 8, 16, 32, 64, 128>(run, body);
}

// Prefetches the cache lines of M[a : e) with e = min(start + run, hi, |M|), a = max(start, lo) (the part of a run
// in [lo, hi) before any wrap), for reading (kWrite = 0) or writing (kWrite = 1).
template <int kWrite>
inline void prefetch_run(const float* mem, int64_t start, int64_t run, int64_t lo, int64_t hi) {
  const int64_t a = std::max(start, lo), e = std::min(start + run, hi);
  if (a >= e) {
    return;
  }
  for (int64_t p = a; p < e; p += 16) {
    __builtin_prefetch(mem + p, kWrite, 3);
  }
  __builtin_prefetch(mem + e - 1, kWrite, 3);
}

// Ids read ahead of use: prefetching the runs of id j + kAhead hides the latency of M's random accesses.
constexpr int64_t kAhead = 8;
// Floats per cache line: the memory ranges of different threads never share a line.
constexpr int64_t kLine = 16;

using torchrec_pss::Bags;
using torchrec_pss::bag_grain;
using torchrec_pss::grad_rows;
using torchrec_pss::GradRows;

// The table key of every bag: keys [1] (all bags) or [B].
struct TableKeys {
  at::Tensor keys_t;
  const int64_t* keys;
  int64_t stride;

  TableKeys(const at::Tensor& keys_, const Bags& bags) : keys_t(keys_.to(at::kCPU, at::kLong).contiguous()) {
    TORCH_CHECK(keys_t.dim() == 1 && (keys_t.numel() == 1 || keys_t.numel() == bags.num_bags),
                "keys must be [1] (one table) or [B] (one table key per bag), got ", keys_t.sizes(), " for B = ",
                bags.num_bags);
    keys = keys_t.data_ptr<int64_t>();
    stride = keys_t.numel() == 1 ? 0 : 1;
  }

  int64_t operator()(int64_t b) const { return keys[b * stride]; }
};

void check_memory(const at::Tensor& memory) {
  TORCH_CHECK(memory.device().is_cpu() && memory.scalar_type() == at::kFloat, "memory must be a float32 CPU tensor");
  TORCH_CHECK(memory.dim() == 1 && memory.is_contiguous() && memory.numel() > 0,
              "memory must be a contiguous, non-empty 1-D tensor [|M|], got ", memory.sizes());
}

GradRows checked_grad(const at::Tensor& grad_out, const Bags& bags) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == bags.num_bags, "grad_out must be [B, dim]");
  return grad_rows(grad_out);
}

// Per id of a batch: its run starts, its pooling scale (weight, / bag length for MEAN), its bag and sign base.
struct Plan {
  std::unique_ptr<uint32_t[]> starts;
  std::unique_ptr<float[]> scale;
  std::unique_ptr<int32_t[]> bag;
  std::unique_ptr<uint32_t[]> sign_base;

  Plan(const Hasher& h, const Bags& bags, const TableKeys& keys, bool mean)
      : starts(uninitialized<uint32_t>(bags.num_ids * h.chunks)),
        scale(uninitialized<float>(bags.num_ids)),
        bag(uninitialized<int32_t>(bags.num_ids)),
        sign_base(uninitialized<uint32_t>(h.use_sign ? bags.num_ids : 0)) {
    TORCH_CHECK(bags.num_bags < (int64_t{1} << 31), "too many bags");
    at::parallel_for(0, bags.num_bags, bag_grain(bags, h.dim), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
        const float divisor = mean ? static_cast<float>(std::max<int64_t>(last - first, 1)) : 1.0f;
        const TableTerms table = h.table_terms(keys(b));
        for (int64_t j = first; j < last; ++j) {
          const int64_t x = bags.ids[j];
          h.starts(x, table, starts.get() + j * h.chunks);
          scale[j] = bags.weight(j) / divisor;
          bag[j] = static_cast<int32_t>(b);
          if (h.use_sign) {
            sign_base[j] = h.sign_base(x, table);
          }
        }
      }
    });
  }
};

// Elements scattered per thread at least: smaller scatters run on fewer threads (a small batch on one, without
// waking the pool).
constexpr int64_t kScatterGrain = 16384;

// Splits [0, |M|) into one range per thread (boundaries on multiples of `align`) and runs body(lo, hi) on each;
// `elements` (the number of element updates) limits the threads to one per kScatterGrain updates.
template <class Body>
void over_memory_ranges(int64_t m, int64_t align, int64_t elements, Body&& body) {
  const int64_t units = (m + align - 1) / align;
  const int64_t wanted = std::min<int64_t>(at::get_num_threads(), (elements + kScatterGrain - 1) / kScatterGrain);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(wanted, units));
  if (parts == 1) {
    body(0, m);
    return;
  }
  const int64_t span = (units + parts - 1) / parts * align;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t lo = p * span, hi = std::min(m, lo + span);
      if (lo < hi) {
        body(lo, hi);
      }
    }
  });
}

// dst[pos] += alpha_scale * scale_j * sign * grad for every element of every run that falls in [lo, hi);
// touched(position, length) is called after each contiguous piece.
template <int64_t kRun, class Touched>
void scatter_range(const Hasher& h, const Plan& plan, int64_t num_ids, const GradRows& grad, float alpha_scale,
                   float* dst, int64_t lo, int64_t hi, Touched&& touched) {
  const int64_t run = kRun > 0 ? kRun : h.run;
  for (int64_t j = 0; j < num_ids; ++j) {
    if (j + kAhead < num_ids) {
      const uint32_t* ahead = plan.starts.get() + (j + kAhead) * h.chunks;
      for (int64_t c = 0; c < h.chunks; ++c) {
        prefetch_run<1>(dst, ahead[c], run, lo, hi);
      }
    }
    const uint32_t* starts = plan.starts.get() + j * h.chunks;
    const float alpha = alpha_scale * plan.scale[j];
    const float* row = grad.row(plan.bag[j]);
    const auto add = [&](int64_t pos, int64_t i0, auto len) {
      float* __restrict__ out = dst + pos;
      const float* __restrict__ g = row + i0;
      if (h.use_sign) {
        const uint32_t base = plan.sign_base[j];
        for (int64_t k = 0; k < len; ++k) {
          out[k] += alpha * (h.sign(base, i0 + k) * g[k]);
        }
      } else {
        for (int64_t k = 0; k < len; ++k) {
          out[k] += alpha * g[k];
        }
      }
      touched(pos, static_cast<int64_t>(len));
    };
    for (int64_t c = 0; c < h.chunks; ++c) {
      for_pieces<kRun>(starts[c], run, h.m, [&](int64_t pos, int64_t r, auto len) {
        if (pos >= lo && pos + len <= hi) {
          add(pos, c * run + r, len);
          return;
        }
        const int64_t first = std::max(pos, lo), last = std::min<int64_t>(pos + len, hi);
        if (first < last) {
          add(first, c * run + r + (first - pos), last - first);
        }
      });
    }
  }
}

// x with its sign flipped where `mask` holds the sign bit.
inline float flip(float x, uint32_t mask) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits ^= mask;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// The hashes of one id for short runs: its run starts [chunks] and element sign masks [dim] (zeros without signs).
struct ShortId {
  std::vector<uint32_t> starts, masks;

  explicit ShortId(const Hasher& h) : starts(h.chunks), masks(h.dim, 0u) {}

  void hash(const Hasher& h, int64_t x, const TableTerms& table) {
    h.short_starts(h.loc_base(x, table), starts.data());
    if (h.use_sign) {
      h.sign_masks(h.sign_base(x, table), masks.data());
    }
  }
};

// Memory (floats) above which short runs are prefetched: below it M stays in the caches.
constexpr int64_t kCachedFloats = int64_t{1} << 18;
// Runs prefetched ahead of use by ShortIds (in whole ids, 1 to kAhead).
constexpr int64_t kShortRunsAhead = 128;

// The hashes of the ids of bags [b0, b1), in order (next()): each id is hashed some ids before its use, and when M
// is larger than the caches the runs in [lo, hi) it reads (kWrite = 0) or writes (kWrite = 1) are prefetched then.
template <int kWrite>
class ShortIds {
 public:
  ShortIds(const Hasher& h, const Bags& bags, const TableKeys& keys, const float* mem, int64_t b0, int64_t b1,
           int64_t lo, int64_t hi)
      : h_(h),
        bags_(bags),
        keys_(keys),
        mem_(mem),
        low_(static_cast<uint32_t>(lo)),
        span_(static_cast<uint32_t>(hi - lo)),
        prefetch_(h.m > kCachedFloats),
        ahead_(std::clamp<int64_t>(kShortRunsAhead / h.chunks, 1, kAhead)),
        used_(bags.offsets[b0]),
        hashed_(used_),
        end_(bags.offsets[b1]),
        bag_(b0),
        ring_(ahead_ + 1, ShortId(h)) {
    while (hashed_ < std::min(used_ + ahead_, end_)) {
      hash_next();
    }
  }

  // The hashes of the next id.
  const ShortId& next() {
    if (hashed_ < end_) {
      hash_next();  // into the slot of the id used last
    }
    return ring_[used_++ % (ahead_ + 1)];
  }

 private:
  void hash_next() {
    while (bags_.offsets[bag_ + 1] <= hashed_) {
      ++bag_;
    }
    ShortId& id = ring_[hashed_ % (ahead_ + 1)];
    id.hash(h_, bags_.ids[hashed_], h_.table_terms(keys_(bag_)));
    if (prefetch_) {
      const auto last = static_cast<uint32_t>(h_.run - 1);
      for (int64_t c = 0; c < h_.chunks; ++c) {  // both ends of the run (it may straddle two cache lines)
        const uint32_t p = id.starts[c], e = std::min(p + last, static_cast<uint32_t>(h_.m - 1));
        __builtin_prefetch(mem_ + (p - low_ < span_ ? p : low_), kWrite, 3);
        __builtin_prefetch(mem_ + (e - low_ < span_ ? e : low_), kWrite, 3);
      }
    }
    ++hashed_;
  }

  const Hasher& h_;
  const Bags& bags_;
  const TableKeys& keys_;
  const float* mem_;
  uint32_t low_, span_;
  bool prefetch_;
  int64_t ahead_, used_, hashed_, end_, bag_;
  std::vector<ShortId> ring_;
};

// What the scatters of SGD and of the dense backward mark: nothing (Adagrad's marks the blocks it touches).
struct NoMarks {
  void operator()(int64_t, int64_t) const {}
};

#if defined(__AVX512F__) && defined(__AVX512CD__)
// dst[p] += alpha * flip(row[c], masks[c]) with p = starts[c] for the chunks c of one id's runs of one element
// (HashedNet) whose p is in [low, low + span), 16 chunks at a time: one gather and one scatter instead of 16
// read-modify-writes that the core would run one after another. Stops before the first 16 whose in-range positions
// repeat (a scatter would keep one update of them) and returns the first chunk not done.
inline int64_t scatter_single_runs(const uint32_t* starts, const uint32_t* masks, const float* row, float alpha,
                                   float* dst, uint32_t low, uint32_t span, int64_t chunks) {
  const __m512 scale = _mm512_set1_ps(alpha);
  const __m512i lows = _mm512_set1_epi32(static_cast<int>(low)), spans = _mm512_set1_epi32(static_cast<int>(span));
  int64_t c = 0;
  for (; c + 16 <= chunks; c += 16) {
    const __m512i positions = _mm512_loadu_si512(starts + c);  // < |M| <= 2^30: valid int32 indices
    const __mmask16 in = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(positions, lows), spans);
    const __m512i earlier = _mm512_maskz_conflict_epi32(in, positions);
    if (_mm512_mask_test_epi32_mask(in, earlier, earlier) != 0) {
      break;
    }
    const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, positions, dst, 4);
    const __m512i bits = _mm512_xor_si512(_mm512_castps_si512(_mm512_loadu_ps(row + c)), _mm512_loadu_si512(masks + c));
    _mm512_mask_i32scatter_ps(dst, in, positions, _mm512_fmadd_ps(scale, _mm512_castsi512_ps(bits), old), 4);
  }
  return c;
}
#else
inline int64_t scatter_single_runs(const uint32_t*, const uint32_t*, const float*, float, float*, uint32_t, uint32_t,
                                   int64_t) {
  return 0;
}
#endif

// The short run lengths with a compiled case.
template <class Body>
void dispatch_short(int64_t run, Body&& body) {
  dispatch_among<1, 2, 4, 8>(run, body);
}

// scatter_range for short runs (no Plan) over the ids of bags [b0, b1): hashes them (ShortIds) and keeps the
// elements in [lo, hi).
template <int64_t kRun, class Touched>
void scatter_short_range(const Hasher& h, const Bags& bags, const TableKeys& keys, bool mean, const GradRows& grad,
                         float alpha_scale, float* dst, int64_t b0, int64_t b1, int64_t lo, int64_t hi,
                         Touched&& touched) {
  const int64_t run = kRun > 0 ? kRun : h.run, chunks = h.chunks;
  const auto m = static_cast<uint32_t>(h.m), low = static_cast<uint32_t>(lo), span = static_cast<uint32_t>(hi - lo);
  ShortIds<1> ids(h, bags, keys, dst, b0, b1, lo, hi);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
    const float divisor = mean ? static_cast<float>(std::max<int64_t>(last - first, 1)) : 1.0f;
    const float* __restrict__ row = grad.row(b);
    for (int64_t j = first; j < last; ++j) {
      const ShortId& id = ids.next();
      const float alpha = alpha_scale * (bags.weight(j) / divisor);
      const uint32_t* __restrict__ starts = id.starts.data();
      const uint32_t* __restrict__ masks = id.masks.data();
      int64_t done = 0;
      if constexpr (kRun == 1 && std::is_same_v<std::decay_t<Touched>, NoMarks>) {
        done = scatter_single_runs(starts, masks, row, alpha, dst, low, span, chunks);
      }
      for (int64_t c = done; c < chunks; ++c) {
        const uint32_t start = starts[c];
        const float* __restrict__ g = row + c * run;
        const uint32_t* __restrict__ mask = masks + c * run;
        if (start - low < span && start + run - 1 - low < span) {  // the whole run is in [lo, hi): no wrap
          float* __restrict__ out = dst + start;
          for (int64_t k = 0; k < run; ++k) {
            out[k] += alpha * flip(g[k], mask[k]);
          }
          touched(static_cast<int64_t>(start), run);
          continue;
        }
        for (int64_t k = 0; k < run; ++k) {  // the run wraps or crosses lo / hi
          uint32_t p = start + static_cast<uint32_t>(k);
          p = p >= m ? p - m : p;
          if (p - low < span) {
            dst[p] += alpha * flip(g[k], mask[k]);
            touched(static_cast<int64_t>(p), int64_t{1});
          }
        }
      }
    }
  }
}

// The positions of a batch's gradient for scatter: a Plan, or none for short runs (hashed inside every scatter).
std::optional<Plan> scatter_plan(const Hasher& h, const Bags& bags, const TableKeys& keys, bool mean) {
  std::optional<Plan> plan;
  if (!h.short_runs()) {
    plan.emplace(h, bags, keys, mean);
  }
  return plan;
}

// dst[pos] += alpha_scale * (the gradient of M at pos) for pos in [lo, hi), through `plan` (scatter_plan).
template <class Touched>
void scatter(const Hasher& h, const Bags& bags, const TableKeys& keys, bool mean, const std::optional<Plan>& plan,
             const GradRows& grad, float alpha_scale, float* dst, int64_t lo, int64_t hi, Touched&& touched) {
  if (!plan) {
    dispatch_short(h.run, [&](auto run) {
      scatter_short_range<decltype(run)::value>(h, bags, keys, mean, grad, alpha_scale, dst, 0, bags.num_bags, lo, hi,
                                                touched);
    });
    return;
  }
  dispatch_run(h.run, [&](auto run) {
    scatter_range<decltype(run)::value>(h, *plan, bags.num_ids, grad, alpha_scale, dst, lo, hi, touched);
  });
}

// Private copies of M (floats, all threads together) up to which scatter_all splits short runs by bags.
constexpr int64_t kPrivateFloats = int64_t{1} << 22;

// dst[pos] += alpha_scale * (the gradient of M at pos) for all of M. Threads own memory ranges (scatter), except
// for short runs when M is small: then they split the bags, as every thread would otherwise hash every id and
// mispredict whether each element is its own. Part 0 adds into dst, the others into zeroed private copies of M
// that are summed into dst afterwards.
void scatter_all(const Hasher& h, const Bags& bags, const TableKeys& keys, bool mean, const std::optional<Plan>& plan,
                 const GradRows& grad, float alpha_scale, float* dst) {
  const int64_t elements = bags.num_ids * h.dim;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), (elements + kScatterGrain - 1) / kScatterGrain, bags.num_bags}));
  if (plan || parts == 1 || (parts - 1) * h.m > kPrivateFloats) {
    over_memory_ranges(h.m, kLine, elements, [&](int64_t lo, int64_t hi) {
      scatter(h, bags, keys, mean, plan, grad, alpha_scale, dst, lo, hi, NoMarks{});
    });
    return;
  }
  std::vector<int64_t> bounds(parts + 1, bags.num_bags);  // bags [bounds[p], bounds[p + 1]) hold ~N / parts ids
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t* at = std::lower_bound(bags.offsets, bags.offsets + bags.num_bags, bags.num_ids * p / parts);
    bounds[p] = at - bags.offsets;
  }
  std::vector<std::unique_ptr<float[]>> copies(parts - 1);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* target = dst;
      if (p > 0) {
        copies[p - 1] = uninitialized<float>(h.m);
        target = copies[p - 1].get();
        std::fill(target, target + h.m, 0.0f);
      }
      dispatch_short(h.run, [&](auto run) {
        scatter_short_range<decltype(run)::value>(h, bags, keys, mean, grad, alpha_scale, target, bounds[p],
                                                  bounds[p + 1], 0, h.m, NoMarks{});
      });
    }
  });
  at::parallel_for(0, h.m, kScatterGrain, [&](int64_t i0, int64_t i1) {
    for (const auto& copy : copies) {
      const float* __restrict__ src = copy.get();
      float* __restrict__ out = dst;
      for (int64_t i = i0; i < i1; ++i) {
        out[i] += src[i];
      }
    }
  });
}

// Prefetches the runs of id j for reading.
inline void prefetch_id(const Hasher& h, const Plan& plan, const float* mem, int64_t j) {
  const uint32_t* starts = plan.starts.get() + j * h.chunks;
  for (int64_t c = 0; c < h.chunks; ++c) {
    prefetch_run<0>(mem, starts[c], h.run, 0, h.m);
  }
}

// Points at the run M[start : start + run] (circular): M itself, or `gathered` filled when the run wraps
// (element by element: no library call, so callers' accumulators can stay in registers).
inline const float* run_at(const Hasher& h, const float* mem, uint32_t start, int64_t run, float* gathered) {
  if (start + run <= h.m) {
    return mem + start;
  }
  int64_t pos = start;
  for (int64_t k = 0; k < run; ++k) {
    gathered[k] = mem[pos];
    pos = pos + 1 == h.m ? 0 : pos + 1;
  }
  return gathered;
}

// out[b] = sum_j w_j * E[ids_j] (/ bag length for MEAN) for the bags [b0, b1), one run of columns at a time
// (accumulated in registers when kRun > 0) over the ids of the bag. Runs are prefetched one per run read, in
// id order, from kAhead ids past the current bag up to kAhead ids past the next one, so each arrives about
// a bag ahead of its use.
template <int64_t kRun>
void forward_range(const Hasher& h, const Bags& bags, const Plan& plan, const float* mem, float* out, bool mean,
                   int64_t b0, int64_t b1) {
  const int64_t run = kRun > 0 ? kRun : h.run, dim = h.dim, chunks = h.chunks;
  const int64_t end_run = bags.offsets[b1] * chunks;
  std::vector<float> gathered(run);
  int64_t prefetched = bags.offsets[b0] * chunks;  // runs are numbered id * chunks + chunk, as in plan.starts
  const auto prefetch_until = [&](int64_t stop) {
    for (stop = std::min(stop, end_run); prefetched < stop; ++prefetched) {
      prefetch_run<0>(mem, plan.starts[prefetched], run, 0, h.m);
    }
  };
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
    prefetch_until((last + kAhead) * chunks);
    const int64_t limit = ((b + 2 <= b1 ? bags.offsets[b + 2] : last) + kAhead) * chunks;
    const float divisor = mean && last > first ? static_cast<float>(last - first) : 1.0f;
    // acc[k] += w_j * sign * M[start_jc + k] over the ids j of the bag, k < len (a constant when kRun > 0).
    const auto accumulate = [&](float* __restrict__ acc, int64_t c, auto len) {
      for (int64_t j = first; j < last; ++j) {
        if (prefetched < limit) {
          prefetch_until(prefetched + 1);
        }
        const float w = bags.weight(j);
        const float* __restrict__ src = run_at(h, mem, plan.starts[j * chunks + c], run, gathered.data());
        if (h.use_sign) {
          const uint32_t base = plan.sign_base[j];
          for (int64_t k = 0; k < len; ++k) {
            acc[k] += w * (h.sign(base, c * len + k) * src[k]);
          }
        } else {
          for (int64_t k = 0; k < len; ++k) {
            acc[k] += w * src[k];
          }
        }
      }
    };
    for (int64_t c = 0; c < chunks; ++c) {
      float* __restrict__ dst = out + b * dim + c * run;
      if constexpr (kRun > 0) {
        float acc[kRun] = {};
        accumulate(acc, c, std::integral_constant<int64_t, kRun>{});
        for (int64_t k = 0; k < kRun; ++k) {
          dst[k] = acc[k] / divisor;
        }
      } else {
        std::fill(dst, dst + run, 0.0f);
        accumulate(dst, c, run);
        for (int64_t k = 0; k < run; ++k) {
          dst[k] /= divisor;
        }
      }
    }
  }
}

// forward_range for short runs (no Plan): the ids are hashed as they are read (ShortIds) and accumulate into a
// row of d floats.
template <int64_t kRun>
void forward_short_range(const Hasher& h, const Bags& bags, const TableKeys& keys, const float* mem, float* out,
                         bool mean, int64_t b0, int64_t b1) {
  const int64_t run = kRun > 0 ? kRun : h.run, dim = h.dim, chunks = h.chunks;
  const auto m = static_cast<uint32_t>(h.m);
  ShortIds<0> ids(h, bags, keys, mem, b0, b1, 0, h.m);
  std::vector<float> sums(dim);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
    float* __restrict__ acc = sums.data();
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = first; j < last; ++j) {
      const ShortId& id = ids.next();
      const float w = bags.weight(j);
      const uint32_t* __restrict__ starts = id.starts.data();
      const uint32_t* __restrict__ masks = id.masks.data();
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t k = 0; k < run; ++k) {
          uint32_t p = starts[c] + static_cast<uint32_t>(k);
          p = p >= m ? p - m : p;
          acc[c * run + k] += w * flip(mem[p], masks[c * run + k]);
        }
      }
    }
    const float divisor = mean && last > first ? static_cast<float>(last - first) : 1.0f;
    for (int64_t k = 0; k < dim; ++k) {
      out[b * dim + k] = acc[k] / divisor;
    }
  }
}

// out[j] = <grad[bag of j], E[ids_j]> (/ bag length for MEAN) for the ids of bags [b0, b1).
template <int64_t kRun>
void weights_grad_range(const Hasher& h, const Bags& bags, const Plan& plan, const float* mem, const GradRows& grad,
                        float* out, int64_t b0, int64_t b1) {
  const int64_t run = kRun > 0 ? kRun : h.run;
  const int64_t j0 = bags.offsets[b0], j1 = bags.offsets[b1];
  std::vector<float> gathered(run);
  for (int64_t j = j0; j < std::min(j0 + kAhead, j1); ++j) {
    prefetch_id(h, plan, mem, j);
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (j + kAhead < j1) {
      prefetch_id(h, plan, mem, j + kAhead);
    }
    const float* row = grad.row(plan.bag[j]);
    float dot = 0.0f;
    for (int64_t c = 0; c < h.chunks; ++c) {
      const float* __restrict__ src = run_at(h, mem, plan.starts[j * h.chunks + c], run, gathered.data());
      const float* __restrict__ g = row + c * run;
      float part = 0.0f;
      if (h.use_sign) {
        const uint32_t base = plan.sign_base[j];
        for (int64_t k = 0; k < run; ++k) {
          part += g[k] * (h.sign(base, c * run + k) * src[k]);
        }
      } else {
        for (int64_t k = 0; k < run; ++k) {
          part += g[k] * src[k];
        }
      }
      dot += part;
    }
    out[j] = dot * plan.scale[j];
  }
}

// weights_grad_range for short runs (no Plan; `bags` without weights).
template <int64_t kRun>
void weights_grad_short_range(const Hasher& h, const Bags& bags, const TableKeys& keys, const float* mem,
                              const GradRows& grad, float* out, bool mean, int64_t b0, int64_t b1) {
  const int64_t run = kRun > 0 ? kRun : h.run, chunks = h.chunks;
  const auto m = static_cast<uint32_t>(h.m);
  ShortIds<0> ids(h, bags, keys, mem, b0, b1, 0, h.m);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
    const float scale = 1.0f / (mean ? static_cast<float>(std::max<int64_t>(last - first, 1)) : 1.0f);
    const float* __restrict__ row = grad.row(b);
    for (int64_t j = first; j < last; ++j) {
      const ShortId& id = ids.next();
      const uint32_t* __restrict__ starts = id.starts.data();
      const uint32_t* __restrict__ masks = id.masks.data();
      float dot = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t k = 0; k < run; ++k) {
          uint32_t p = starts[c] + static_cast<uint32_t>(k);
          p = p >= m ? p - m : p;
          dot += row[c * run + k] * flip(mem[p], masks[c * run + k]);
        }
      }
      out[j] = dot * scale;
    }
  }
}

// Dense zero scratch of |M| floats and a touched flag per optimizer block, kept all-zero between calls.
struct Scratch {
  std::mutex mutex;
  std::vector<float> grad;
  std::vector<uint8_t> touched;
};

Scratch& scratch() {
  static Scratch instance;
  return instance;
}

// The gradient of M over the positions the batch touches: (positions [U] int64, ascending and unique; values [U]).
// The runs (id, chunk) are sorted by start (two stable 16-bit radix passes), the runs of one start summed, and the
// sums swept in start order: the positions of a run below the last one written are the tail of the output (runs
// have one length, so the positions >= its start written so far are contiguous). Pieces wrapped past the end of M
// (positions < run) are summed apart and merged in front. O(runs) but for the sort; no |M|-sized buffer.
std::tuple<at::Tensor, at::Tensor> sparse_grad(const Hasher& h, const Bags& bags, const Plan& plan, const GradRows& grad,
                                               const at::TensorOptions& options) {
  const int64_t run = h.run, chunks = h.chunks, m = h.m, count = bags.num_ids * chunks;
  TORCH_CHECK(count < (int64_t{1} << 32), "too many runs for a sparse gradient: ", count);
  std::vector<uint64_t> order(count), buffer(count);  // start << 32 | run number (id * chunks + chunk)
  for (int64_t r = 0; r < count; ++r) {
    order[r] = static_cast<uint64_t>(plan.starts[r]) << 32 | static_cast<uint64_t>(r);
  }
  for (int shift = 32; shift < 64 && (m - 1) >> (shift - 32) > 0; shift += 16) {
    std::vector<int64_t> next(65537, 0);
    for (const uint64_t key : order) {
      ++next[((key >> shift) & 0xFFFFu) + 1];
    }
    std::partial_sum(next.begin(), next.end(), next.begin());
    for (const uint64_t key : order) {
      buffer[next[(key >> shift) & 0xFFFFu]++] = key;
    }
    order.swap(buffer);
  }
  std::vector<int64_t> positions;
  std::vector<float> values, sum(run), head(run, 0.0f);
  std::vector<uint8_t> in_head(run, 0);
  int64_t last = -1;
  for (int64_t e = 0; e < count;) {
    const uint64_t start = order[e] >> 32;
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (; e < count && order[e] >> 32 == start; ++e) {
      const auto r = static_cast<int64_t>(order[e] & 0xFFFFFFFFu);
      const int64_t j = r / chunks, c = r % chunks;
      const float alpha = plan.scale[j];
      const float* row = grad.row(plan.bag[j]) + c * run;
      for (int64_t k = 0; k < run; ++k) {
        sum[k] += alpha * ((h.use_sign ? h.sign(plan.sign_base[j], c * run + k) : 1.0f) * row[k]);
      }
    }
    for (int64_t k = 0; k < run; ++k) {
      const int64_t p = static_cast<int64_t>(start) + k;
      if (p >= m) {
        head[p % m] += sum[k];
        in_head[p % m] = 1;
      } else if (p > last) {
        positions.push_back(p);
        values.push_back(sum[k]);
        last = p;
      } else {
        values[values.size() - 1 - (last - p)] += sum[k];
      }
    }
  }
  std::vector<int64_t> merged_positions;
  std::vector<float> merged_values;
  size_t next = 0;
  for (int64_t p = 0; p < run; ++p) {
    if (!in_head[p]) {
      continue;
    }
    for (; next < positions.size() && positions[next] < p; ++next) {
      merged_positions.push_back(positions[next]);
      merged_values.push_back(values[next]);
    }
    const bool both = next < positions.size() && positions[next] == p;
    merged_positions.push_back(p);
    merged_values.push_back(head[p] + (both ? values[next++] : 0.0f));
  }
  merged_positions.insert(merged_positions.end(), positions.begin() + next, positions.end());
  merged_values.insert(merged_values.end(), values.begin() + next, values.end());
  const auto unique = static_cast<int64_t>(merged_positions.size());
  auto out_positions = at::empty({unique}, options.dtype(at::kLong));
  auto out_values = at::empty({unique}, options.dtype(at::kFloat));
  std::copy(merged_positions.begin(), merged_positions.end(), out_positions.data_ptr<int64_t>());
  std::copy(merged_values.begin(), merged_values.end(), out_values.data_ptr<float>());
  return {out_positions, out_values};
}

}  // namespace

at::Tensor robe_pooled_forward(const at::Tensor& memory, const at::Tensor& ids, const at::Tensor& offsets,
                               const std::optional<at::Tensor>& weights, const at::Tensor& coefficients,
                               const at::Tensor& keys, int64_t dim, int64_t chunk_size, bool use_sign, bool mean) {
  check_memory(memory);
  const Bags bags(ids, offsets, weights);
  const TableKeys table_keys(keys, bags);
  const Hasher h(coefficients, dim, chunk_size, use_sign, memory.numel());
  auto out = at::empty({bags.num_bags, dim}, memory.options());
  const float* mem = memory.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  if (h.short_runs()) {
    dispatch_short(h.run, [&](auto run) {
      at::parallel_for(0, bags.num_bags, bag_grain(bags, dim), [&](int64_t b0, int64_t b1) {
        forward_short_range<decltype(run)::value>(h, bags, table_keys, mem, out_data, mean, b0, b1);
      });
    });
    return out;
  }
  const Plan plan(h, bags, table_keys, mean);
  dispatch_run(h.run, [&](auto run) {
    at::parallel_for(0, bags.num_bags, bag_grain(bags, dim), [&](int64_t b0, int64_t b1) {
      forward_range<decltype(run)::value>(h, bags, plan, mem, out_data, mean, b0, b1);
    });
  });
  return out;
}

at::Tensor robe_pooled_backward(const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& offsets,
                                const std::optional<at::Tensor>& weights, const at::Tensor& coefficients,
                                const at::Tensor& keys, int64_t memory_size, int64_t dim, int64_t chunk_size,
                                bool use_sign, bool mean) {
  const Bags bags(ids, offsets, weights);
  const TableKeys table_keys(keys, bags);
  const auto grad = checked_grad(grad_out, bags);
  const Hasher h(coefficients, dim, chunk_size, use_sign, memory_size);
  TORCH_CHECK(grad.tensor.size(1) == dim, "grad_out must be [B, dim]");
  const auto plan = scatter_plan(h, bags, table_keys, mean);
  auto out = at::zeros({memory_size}, grad.tensor.options());
  scatter_all(h, bags, table_keys, mean, plan, grad, 1.0f, out.data_ptr<float>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> robe_sparse_grad(const at::Tensor& grad_out, const at::Tensor& ids,
                                                    const at::Tensor& offsets, const std::optional<at::Tensor>& weights,
                                                    const at::Tensor& coefficients, const at::Tensor& keys,
                                                    int64_t memory_size, int64_t dim, int64_t chunk_size, bool use_sign,
                                                    bool mean) {
  const Bags bags(ids, offsets, weights);
  const TableKeys table_keys(keys, bags);
  const auto grad = checked_grad(grad_out, bags);
  const Hasher h(coefficients, dim, chunk_size, use_sign, memory_size);
  TORCH_CHECK(grad.tensor.size(1) == dim, "grad_out must be [B, dim]");
  const Plan plan(h, bags, table_keys, mean);
  return sparse_grad(h, bags, plan, grad, grad.tensor.options());
}

void robe_sgd_update_(at::Tensor& memory, const at::Tensor& grad_out, const at::Tensor& ids, const at::Tensor& offsets,
                      const std::optional<at::Tensor>& weights, const at::Tensor& coefficients, const at::Tensor& keys,
                      int64_t chunk_size, bool use_sign, bool mean, double lr) {
  check_memory(memory);
  const Bags bags(ids, offsets, weights);
  const TableKeys table_keys(keys, bags);
  const auto grad = checked_grad(grad_out, bags);
  const int64_t dim = grad.tensor.size(1);
  const Hasher h(coefficients, dim, chunk_size, use_sign, memory.numel());
  const auto plan = scatter_plan(h, bags, table_keys, mean);
  scatter_all(h, bags, table_keys, mean, plan, grad, static_cast<float>(-lr), memory.data_ptr<float>());
}

void robe_adagrad_update_(at::Tensor& memory, at::Tensor& accumulator, const at::Tensor& grad_out,
                          const at::Tensor& ids, const at::Tensor& offsets, const std::optional<at::Tensor>& weights,
                          const at::Tensor& coefficients, const at::Tensor& keys, int64_t chunk_size, bool use_sign,
                          bool mean, double lr, double eps, int64_t block_size) {
  check_memory(memory);
  const int64_t m = memory.numel();
  TORCH_CHECK(block_size >= 1, "block_size must be positive");
  const int64_t blocks = (m + block_size - 1) / block_size;
  TORCH_CHECK(accumulator.device().is_cpu() && accumulator.scalar_type() == at::kFloat &&
                  accumulator.is_contiguous() && accumulator.numel() == blocks,
              "accumulator must be a contiguous float32 CPU tensor of ceil(|M| / block_size) entries");
  const Bags bags(ids, offsets, weights);
  const TableKeys table_keys(keys, bags);
  const auto grad = checked_grad(grad_out, bags);
  const int64_t dim = grad.tensor.size(1);
  const Hasher h(coefficients, dim, chunk_size, use_sign, m);
  const auto plan = scatter_plan(h, bags, table_keys, mean);
  float* param = memory.data_ptr<float>();
  float* sum = accumulator.data_ptr<float>();
  const float step = static_cast<float>(lr), epsilon = static_cast<float>(eps);
  const float block = static_cast<float>(block_size);
  Scratch& s = scratch();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (static_cast<int64_t>(s.grad.size()) < m) {
    s.grad.resize(m, 0.0f);
  }
  if (static_cast<int64_t>(s.touched.size()) < blocks) {
    s.touched.resize(blocks, 0);
  }
  float* acc = s.grad.data();
  uint8_t* flag = s.touched.data();
  over_memory_ranges(m, block_size, bags.num_ids * dim, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> touched;
    scatter(h, bags, table_keys, mean, plan, grad, 1.0f, acc, lo, hi, [&](int64_t a, int64_t n) {
      for (int64_t blk = a / block_size; blk <= (a + n - 1) / block_size; ++blk) {
        if (!flag[blk]) {
          flag[blk] = 1;
          touched.push_back(blk);
        }
      }
    });
    const int64_t count = static_cast<int64_t>(touched.size());
    for (int64_t i = 0; i < count; ++i) {
      if (i + kAhead < count) {
        const int64_t ahead = touched[i + kAhead] * block_size;
        prefetch_run<1>(acc, ahead, block_size, 0, m);
        prefetch_run<1>(param, ahead, block_size, 0, m);
        __builtin_prefetch(sum + touched[i + kAhead], 1, 3);
      }
      const int64_t blk = touched[i];
      const int64_t first = blk * block_size, last = std::min(m, first + block_size);
      float squares = 0.0f;
      for (int64_t e = first; e < last; ++e) {
        squares += acc[e] * acc[e];
      }
      sum[blk] += squares / block;
      const float std_dev = std::sqrt(sum[blk]) + epsilon;
      for (int64_t e = first; e < last; ++e) {
        param[e] -= step * (acc[e] / std_dev);
        acc[e] = 0.0f;
      }
      flag[blk] = 0;
    }
  });
}

at::Tensor robe_weights_grad(const at::Tensor& memory, const at::Tensor& grad_out, const at::Tensor& ids,
                             const at::Tensor& offsets, const at::Tensor& coefficients, const at::Tensor& keys,
                             int64_t chunk_size, bool use_sign, bool mean) {
  check_memory(memory);
  const Bags bags(ids, offsets, std::nullopt);
  const TableKeys table_keys(keys, bags);
  const auto grad = checked_grad(grad_out, bags);
  const int64_t dim = grad.tensor.size(1);
  const Hasher h(coefficients, dim, chunk_size, use_sign, memory.numel());
  auto out = at::empty({bags.num_ids}, memory.options());
  const float* mem = memory.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  if (h.short_runs()) {
    dispatch_short(h.run, [&](auto run) {
      at::parallel_for(0, bags.num_bags, bag_grain(bags, dim), [&](int64_t b0, int64_t b1) {
        weights_grad_short_range<decltype(run)::value>(h, bags, table_keys, mem, grad, out_data, mean, b0, b1);
      });
    });
    return out;
  }
  const Plan plan(h, bags, table_keys, mean);  // no weights: scale = 1 / bag length for MEAN
  dispatch_run(h.run, [&](auto run) {
    at::parallel_for(0, bags.num_bags, bag_grain(bags, dim), [&](int64_t b0, int64_t b1) {
      weights_grad_range<decltype(run)::value>(h, bags, plan, mem, grad, out_data, b0, b1);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  using py::arg;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  module.doc() = "ROBE-Z CPU kernels (see torchrec_pss_plugins.robe.cpu_kernels)";
  module.def("robe_pooled_forward", &robe_pooled_forward, no_gil, "Pooled ROBE lookup: [B, dim]", arg("memory"),
             arg("ids"), arg("offsets"), arg("weights"), arg("coefficients"), arg("keys"), arg("dim"), arg("chunk_size"),
             arg("use_sign"), arg("mean"));
  module.def("robe_pooled_backward", &robe_pooled_backward, no_gil, "Dense memory gradient: [|M|]",
             arg("grad_out"), arg("ids"), arg("offsets"), arg("weights"), arg("coefficients"), arg("keys"),
             arg("memory_size"), arg("dim"), arg("chunk_size"), arg("use_sign"), arg("mean"));
  module.def("robe_sparse_grad", &robe_sparse_grad, no_gil,
             "Memory gradient over the touched positions: (positions [U], values [U])", arg("grad_out"), arg("ids"),
             arg("offsets"), arg("weights"), arg("coefficients"), arg("keys"), arg("memory_size"), arg("dim"),
             arg("chunk_size"), arg("use_sign"), arg("mean"));
  module.def("robe_sgd_update_", &robe_sgd_update_, no_gil, "Backward fused with SGD, in place", arg("memory"),
             arg("grad_out"), arg("ids"), arg("offsets"), arg("weights"), arg("coefficients"), arg("keys"),
             arg("chunk_size"), arg("use_sign"), arg("mean"), arg("lr"));
  module.def("robe_adagrad_update_", &robe_adagrad_update_, no_gil,
             "Backward fused with (blockwise) Adagrad, in place", arg("memory"), arg("accumulator"), arg("grad_out"),
             arg("ids"), arg("offsets"), arg("weights"), arg("coefficients"), arg("keys"), arg("chunk_size"),
             arg("use_sign"), arg("mean"), arg("lr"), arg("eps"), arg("block_size"));
  module.def("robe_weights_grad", &robe_weights_grad, no_gil, "Gradient of the per-sample weights: [N]",
             arg("memory"), arg("grad_out"), arg("ids"), arg("offsets"), arg("coefficients"), arg("keys"),
             arg("chunk_size"), arg("use_sign"), arg("mean"));
}
