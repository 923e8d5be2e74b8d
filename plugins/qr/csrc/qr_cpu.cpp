// QR compositional embeddings on the CPU: fused digits + compose + pool forward, its dense backward, the parts'
// gradients over the rows a batch reads (for sparse gradients) and the gradient of the per-sample weights. The
// formulas are the contract of plugins/qr/reference.py:
//
//   row_j(x) = (x // c^j) mod c  for j < k - 1,   row_{k-1}(x) = x // c^(k-1)   (floor division, any int64 x)
//   E[x] = op(P_0[row_0(x)], ..., P_{k-1}[row_{k-1}(x)])   (mult / add elementwise, concat side by side)
//   out[b] = sum over the ids x of bag b of w_x E[x]   (/ bag length for MEAN; empty bags give zeros)
//
// A Plan computes every id's rows once per call (in parallel over bags; divisions by c are a multiply for
// operands below 2^32) and checks them against the part tables. The forward pools bags in parallel (software
// prefetching of the rows a few ids ahead measured no gain: the rows of successive ids are independent loads that
// the out-of-order core already overlaps). The backward scatters without atomics and without lost updates:
// the largest part's rows are split into one range per thread (each thread scans all ids and handles those whose
// row of that part is in its range, as robe_cpu.cpp does); parts small next to the batch (part j < k - 1 has c
// rows) are accumulated into one private buffer per thread, summed at the end; any other large part gets its own
// range-owned pass.

#include <torch/extension.h>

#include "bags.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

enum class Operation { kMult, kAdd, kConcat };

Operation parse_operation(const std::string& name) {
  if (name == "mult") {
    return Operation::kMult;
  }
  if (name == "add") {
    return Operation::kAdd;
  }
  TORCH_CHECK(name == "concat", "operation must be 'mult', 'add' or 'concat', got '", name, "'");
  return Operation::kConcat;
}

template <class T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// Floor division and non-negative remainder by a fixed c >= 1, as torch.div(rounding_mode="floor") and
// torch.remainder: Lemire's multiply (exact for every 32-bit operand and 2 <= c < 2^32) for 0 <= x < 2^32, the
// hardware division otherwise.
struct Divider {
  int64_t c;
  uint64_t magic;  // ceil(2^64 / c) for 2 <= c < 2^32, else 0 (no fast path)

  explicit Divider(int64_t c_)
      : c(c_),
        magic(c_ >= 2 && c_ <= std::numeric_limits<uint32_t>::max()
                  ? ~uint64_t{0} / static_cast<uint64_t>(c_) + 1
                  : 0) {}

  // x // c, with x mod c in `remainder`.
  int64_t divide(int64_t x, int64_t& remainder) const {
    if (magic != 0 && static_cast<uint64_t>(x) <= std::numeric_limits<uint32_t>::max()) {
      const auto q = static_cast<int64_t>((static_cast<unsigned __int128>(magic) * static_cast<uint64_t>(x)) >> 64);
      remainder = x - q * c;
      return q;
    }
    int64_t q = x / c, r = x % c;
    if (r < 0) {
      r += c;
      --q;
    }
    remainder = r;
    return q;
  }
};

// The part tables: k >= 2 contiguous float32 CPU tensors [rows_j, width].
struct Parts {
  std::vector<at::Tensor> tensors;
  std::vector<const float*> data;
  std::vector<int64_t> rows;
  int64_t k, width, dim;
  Operation op;

  Parts(const std::vector<at::Tensor>& parts, const std::string& operation) : op(parse_operation(operation)) {
    k = static_cast<int64_t>(parts.size());
    TORCH_CHECK(k >= 2, "parts must hold at least 2 part tables, got ", k);
    for (int64_t j = 0; j < k; ++j) {
      const at::Tensor& part = parts[j];
      TORCH_CHECK(part.device().is_cpu() && part.scalar_type() == at::kFloat, "part ", j,
                  " must be a float32 CPU tensor, got ", part.scalar_type(), " on ", part.device());
      TORCH_CHECK(part.dim() == 2 && part.size(1) == parts[0].size(1) && part.size(1) > 0,
                  "parts must be 2-D [rows_j, width] tables of one positive width; part ", j, " is ", part.sizes(),
                  j == 0 ? std::string() : c10::str(", part 0 is ", parts[0].sizes()));
      tensors.push_back(part.contiguous());
      data.push_back(tensors.back().data_ptr<float>());
      rows.push_back(part.size(0));
    }
    width = parts[0].size(1);
    dim = op == Operation::kConcat ? k * width : width;
  }
};

using torchrec_pss::Bags;
using torchrec_pss::bag_grain;
using torchrec_pss::grad_rows;
using torchrec_pss::GradRows;

// Per id of a batch: its row of every part (part-major: rows[j * N + i]); for the backward also its pooling
// scale (weight, / bag length for MEAN) and its bag.
struct Plan {
  std::unique_ptr<int64_t[]> rows;
  std::unique_ptr<float[]> scale;
  std::unique_ptr<int64_t[]> bag;

  Plan(const Parts& parts, const Bags& bags, int64_t collisions, bool mean, bool with_scale)
      : rows(uninitialized<int64_t>(parts.k * bags.num_ids)),
        scale(uninitialized<float>(with_scale ? bags.num_ids : 0)),
        bag(uninitialized<int64_t>(with_scale ? bags.num_ids : 0)) {
    TORCH_CHECK(collisions >= 1, "collisions must be positive, got ", collisions);
    const Divider divider(collisions);
    const int64_t k = parts.k, n = bags.num_ids;
    std::atomic<int64_t> bad{n};  // the first id with a row outside its part
    at::parallel_for(0, bags.num_bags, bag_grain(bags, parts.dim), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
        const float divisor = mean ? static_cast<float>(std::max<int64_t>(last - first, 1)) : 1.0f;
        for (int64_t i = first; i < last; ++i) {
          int64_t rest = bags.ids[i];
          bool ok = true;
          for (int64_t j = 0; j < k - 1; ++j) {
            int64_t digit;
            rest = divider.divide(rest, digit);
            rows[j * n + i] = digit;
            ok &= digit < parts.rows[j];
          }
          rows[(k - 1) * n + i] = rest;
          ok &= rest >= 0 && rest < parts.rows[k - 1];
          if (!ok) {
            int64_t seen = bad.load();
            while (i < seen && !bad.compare_exchange_weak(seen, i)) {
            }
          }
          if (with_scale) {
            scale[i] = bags.weight(i) / divisor;
            bag[i] = b;
          }
        }
      }
    });
    const int64_t i = bad.load();
    if (i < n) {
      std::string detail;
      for (int64_t j = 0; j < k; ++j) {
        detail += " part " + std::to_string(j) + ": row " + std::to_string(rows[j * n + i]) + " of " +
                  std::to_string(parts.rows[j]) + ";";
      }
      TORCH_CHECK(false, "ids[", i, "] = ", bags.ids[i], " is out of range for the part tables with collisions = ",
                  collisions, ":", detail);
    }
  }

  const int64_t* of_part(int64_t j, int64_t num_ids) const { return rows.get() + j * num_ids; }
};

// acc[0:n) += w * op(rows of the id) for mult / add; `scratch` holds n floats for k > 2.
inline void add_composed(float* __restrict__ acc, const float* const* row, int64_t k, Operation op, float w,
                         int64_t n, float* __restrict__ scratch) {
  const float* __restrict__ a = row[0];
  const float* __restrict__ b = row[1];
  if (k == 2) {
    if (op == Operation::kMult) {
      for (int64_t c = 0; c < n; ++c) {
        acc[c] += w * (a[c] * b[c]);
      }
    } else {
      for (int64_t c = 0; c < n; ++c) {
        acc[c] += w * (a[c] + b[c]);
      }
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    scratch[c] = op == Operation::kMult ? a[c] * b[c] : a[c] + b[c];
  }
  for (int64_t j = 2; j < k; ++j) {
    const float* __restrict__ r = row[j];
    if (op == Operation::kMult) {
      for (int64_t c = 0; c < n; ++c) {
        scratch[c] *= r[c];
      }
    } else {
      for (int64_t c = 0; c < n; ++c) {
        scratch[c] += r[c];
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w * scratch[c];
  }
}

// sum_c a[c] * b[c] in kLanes independent partial sums (a float reduction vectorises only when split by hand).
constexpr int64_t kLanes = 16;
inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += a[c + l] * b[c + l];
    }
  }
  for (; c < n; ++c) {
    lanes[0] += a[c] * b[c];
  }
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

// Pointers to the rows of id i in every part.
inline void rows_of(const Parts& parts, const Plan& plan, int64_t num_ids, int64_t i, const float** row) {
  for (int64_t j = 0; j < parts.k; ++j) {
    row[j] = parts.data[j] + plan.rows[j * num_ids + i] * parts.width;
  }
}

// out[b] = sum_i w_i E[ids_i] (/ bag length for MEAN) for the bags [b0, b1).
void forward_range(const Parts& parts, const Bags& bags, const Plan& plan, float* out, bool mean, int64_t b0,
                   int64_t b1) {
  const int64_t k = parts.k, width = parts.width, dim = parts.dim, n = bags.num_ids;
  std::vector<const float*> row(k);
  std::vector<float> scratch(width);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t first = bags.offsets[b], last = bags.offsets[b + 1];
    float* __restrict__ acc = out + b * dim;
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t i = first; i < last; ++i) {
      rows_of(parts, plan, n, i, row.data());
      const float w = bags.weight(i);
      if (parts.op == Operation::kConcat) {
        for (int64_t j = 0; j < k; ++j) {
          float* __restrict__ dst = acc + j * width;
          const float* __restrict__ src = row[j];
          for (int64_t c = 0; c < width; ++c) {
            dst[c] += w * src[c];
          }
        }
      } else {
        add_composed(acc, row.data(), k, parts.op, w, width, scratch.data());
      }
    }
    if (mean && last > first) {
      const float divisor = static_cast<float>(last - first);
      for (int64_t c = 0; c < dim; ++c) {
        acc[c] /= divisor;
      }
    }
  }
}

// dst[0:width) += the gradient of part j's row from id i: scale_i * grad[bag_i] (its slice j for concat), times
// the other parts' rows for mult.
inline void add_part_grad(const Parts& parts, const Plan& plan, const GradRows& grad, int64_t i, int64_t j,
                          const float* const* row, float* __restrict__ dst, float* __restrict__ scratch) {
  const int64_t width = parts.width;
  const float s = plan.scale[i];
  const float* __restrict__ g = grad.row(plan.bag[i]) + (parts.op == Operation::kConcat ? j * width : 0);
  if (parts.op != Operation::kMult) {
    for (int64_t c = 0; c < width; ++c) {
      dst[c] += s * g[c];
    }
    return;
  }
  if (parts.k == 2) {
    const float* __restrict__ other = row[1 - j];
    for (int64_t c = 0; c < width; ++c) {
      dst[c] += (s * g[c]) * other[c];
    }
    return;
  }
  for (int64_t c = 0; c < width; ++c) {
    scratch[c] = s * g[c];
  }
  for (int64_t o = 0; o < parts.k; ++o) {
    if (o != j) {
      const float* __restrict__ other = row[o];
      for (int64_t c = 0; c < width; ++c) {
        scratch[c] *= other[c];
      }
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    dst[c] += scratch[c];
  }
}

// Splits [0, rows) into `chunks` ranges on multiples of `align` rows: range p is [bounds[p], bounds[p + 1]).
std::vector<int64_t> row_ranges(int64_t rows, int64_t chunks, int64_t align) {
  const int64_t units = (rows + align - 1) / align;
  const int64_t span = (units + chunks - 1) / chunks * align;
  std::vector<int64_t> bounds;
  for (int64_t p = 0; p <= chunks; ++p) {
    bounds.push_back(std::min(rows, p * span));
  }
  return bounds;
}

// Element updates per thread at least: smaller scatters run on fewer threads (a small batch on one, without
// waking the pool).
constexpr int64_t kScatterGrain = 16384;

// Whether part j's gradient is accumulated in one private buffer per thread (then summed) rather than in row
// ranges owned by one thread each: when zeroing and summing `threads` copies costs less than each thread
// scanning every id.
bool private_part(const Parts& parts, int64_t j, int64_t num_ids, int64_t threads) {
  return threads > 1 && parts.rows[j] * parts.width <= 2 * num_ids;
}

// The dense gradient of every part for the rows of `grad` [B, d].
std::vector<at::Tensor> backward(const GradRows& grad, const Parts& parts, const Bags& bags, const Plan& plan) {
  const int64_t k = parts.k, width = parts.width, n = bags.num_ids;
  const auto options = grad.tensor.options().dtype(at::kFloat);
  std::vector<at::Tensor> grads;
  if (n == 0) {
    for (int64_t j = 0; j < k; ++j) {
      grads.push_back(at::zeros({parts.rows[j], width}, options));
    }
    return grads;
  }
  const int64_t updates = n * k * width;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (updates + kScatterGrain - 1) / kScatterGrain);
  const int64_t align = std::max<int64_t>(1, 16 / width);  // rows of different threads never share a cache line
  const auto chunks_of = [&](int64_t rows) {
    return std::max<int64_t>(1, std::min(threads, (rows + align - 1) / align));
  };
  std::vector<int64_t> owned, shared;  // parts scattered by row ranges / into private buffers
  for (int64_t j = 0; j < k; ++j) {
    (private_part(parts, j, n, threads) ? shared : owned).push_back(j);
    grads.push_back(at::empty({parts.rows[j], width}, options));
  }
  std::sort(owned.begin(), owned.end(), [&](int64_t a, int64_t b) { return parts.rows[a] > parts.rows[b]; });
  // The first pass visits every id once, by row ranges of the largest owned part (if any), else by ranges of ids,
  // and also feeds the shared parts' buffers ([chunks, rows_j, width] each); every other owned part has a pass.
  const int64_t chunks = chunks_of(owned.empty() ? n : parts.rows[owned[0]]);
  std::vector<at::Tensor> buffers;
  for (const int64_t j : shared) {
    buffers.push_back(at::empty({chunks, parts.rows[j], width}, options));
  }
  for (size_t pass = 0; pass < std::max<size_t>(owned.size(), 1); ++pass) {
    const int64_t target = owned.empty() ? -1 : owned[pass];  // -1: no owned part, ranges of ids
    const bool with_shared = pass == 0;
    const int64_t pass_chunks = with_shared ? chunks : chunks_of(parts.rows[target]);
    const auto bounds = row_ranges(target < 0 ? n : parts.rows[target], pass_chunks, target < 0 ? 1 : align);
    at::parallel_for(0, pass_chunks, 1, [&](int64_t p0, int64_t p1) {
      std::vector<const float*> row(k);
      std::vector<float> scratch(width);
      std::vector<float*> shared_dst(shared.size());
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t lo = bounds[p], hi = bounds[p + 1];
        for (size_t s = 0; with_shared && s < shared.size(); ++s) {
          const int64_t size = parts.rows[shared[s]] * width;
          shared_dst[s] = buffers[s].data_ptr<float>() + p * size;
          std::fill(shared_dst[s], shared_dst[s] + size, 0.0f);
        }
        float* target_grad = target < 0 ? nullptr : grads[target].data_ptr<float>();
        if (target >= 0) {
          std::fill(target_grad + lo * width, target_grad + hi * width, 0.0f);
        }
        const auto visit = [&](int64_t i) {
          rows_of(parts, plan, n, i, row.data());
          if (target >= 0) {
            add_part_grad(parts, plan, grad, i, target, row.data(), target_grad + plan.rows[target * n + i] * width,
                          scratch.data());
          }
          for (size_t s = 0; with_shared && s < shared.size(); ++s) {
            const int64_t j = shared[s];
            add_part_grad(parts, plan, grad, i, j, row.data(), shared_dst[s] + plan.rows[j * n + i] * width,
                          scratch.data());
          }
        };
        if (target < 0) {
          for (int64_t i = lo; i < hi; ++i) {
            visit(i);
          }
        } else {
          const int64_t* digit = plan.of_part(target, n);
          for (int64_t i = 0; i < n; ++i) {
            if (digit[i] >= lo && digit[i] < hi) {
              visit(i);
            }
          }
        }
      }
    });
  }
  for (size_t s = 0; s < shared.size(); ++s) {
    const int64_t size = parts.rows[shared[s]] * width;
    const float* buffer = buffers[s].data_ptr<float>();
    float* dst = grads[shared[s]].data_ptr<float>();
    at::parallel_for(0, size, kScatterGrain, [&](int64_t e0, int64_t e1) {
      std::copy(buffer + e0, buffer + e1, dst + e0);
      for (int64_t p = 1; p < chunks; ++p) {
        const float* __restrict__ src = buffer + p * size;
        for (int64_t e = e0; e < e1; ++e) {
          dst[e] += src[e];
        }
      }
    });
  }
  return grads;
}

// The ids of a part grouped by the row they read: rows ascending and unique, order[start[u]:start[u + 1]] the ids
// reading rows[u], in id order. A counting sort over a slot per row where the part has few rows per id; a stable
// sort of the ids otherwise, so that a call costs O(n log n), not O(rows of the part).
struct RowGroups {
  std::vector<int64_t> rows, start, order;
};

RowGroups group_by_row(const int64_t* digit, int64_t n, int64_t num_rows) {
  RowGroups g;
  g.order.resize(n);
  if (num_rows > 4 * n + 1024) {
    std::iota(g.order.begin(), g.order.end(), 0);
    std::stable_sort(g.order.begin(), g.order.end(), [digit](int64_t a, int64_t b) { return digit[a] < digit[b]; });
    for (int64_t e = 0; e < n; ++e) {
      if (e == 0 || digit[g.order[e]] != digit[g.order[e - 1]]) {
        g.rows.push_back(digit[g.order[e]]);
        g.start.push_back(e);
      }
    }
    g.start.push_back(n);
    return g;
  }
  std::vector<int64_t> slot(num_rows, 0);
  for (int64_t i = 0; i < n; ++i) {
    slot[digit[i]] = 1;
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    slot[r] = slot[r] ? static_cast<int64_t>(g.rows.size()) : -1;
    if (slot[r] >= 0) {
      g.rows.push_back(r);
    }
  }
  g.start.assign(g.rows.size() + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    ++g.start[slot[digit[i]] + 1];
  }
  std::partial_sum(g.start.begin(), g.start.end(), g.start.begin());
  std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    g.order[next[slot[digit[i]]]++] = i;
  }
  return g;
}

// Part j's gradient over the rows the batch reads: (rows [U] int64, ascending, unique; values [U, width]); each
// thread sums the ids of its own range of rows, in id order.
std::tuple<at::Tensor, at::Tensor> part_grad_rows(const GradRows& grad, const Parts& parts, const Bags& bags,
                                                  const Plan& plan, int64_t j) {
  const int64_t n = bags.num_ids, width = parts.width;
  const RowGroups groups = group_by_row(plan.of_part(j, n), n, parts.rows[j]);
  const int64_t unique = static_cast<int64_t>(groups.rows.size());
  const std::vector<int64_t>& start = groups.start;
  const std::vector<int64_t>& order = groups.order;
  auto rows = at::empty({unique}, grad.tensor.options().dtype(at::kLong));
  std::copy(groups.rows.begin(), groups.rows.end(), rows.data_ptr<int64_t>());
  auto values = at::zeros({unique, width}, grad.tensor.options().dtype(at::kFloat));
  float* values_data = values.data_ptr<float>();
  const int64_t updates_per_row = std::max<int64_t>(1, n / std::max<int64_t>(unique, 1) * width);
  at::parallel_for(0, unique, std::max<int64_t>(1, kScatterGrain / updates_per_row), [&](int64_t u0, int64_t u1) {
    std::vector<const float*> row(parts.k);
    std::vector<float> scratch(width);
    for (int64_t u = u0; u < u1; ++u) {
      for (int64_t e = start[u]; e < start[u + 1]; ++e) {
        const int64_t i = order[e];
        rows_of(parts, plan, n, i, row.data());
        add_part_grad(parts, plan, grad, i, j, row.data(), values_data + u * width, scratch.data());
      }
    }
  });
  return {rows, values};
}

GradRows checked_grad(const at::Tensor& grad_out, const Parts& parts, const Bags& bags) {
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.is_floating_point(), "grad_out must be a floating CPU tensor");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == bags.num_bags && grad_out.size(1) == parts.dim,
              "grad_out must be [B, d] = [", bags.num_bags, ", ", parts.dim, "], got ", grad_out.sizes());
  return grad_rows(grad_out);
}

}  // namespace

at::Tensor qr_pooled_forward(const std::vector<at::Tensor>& parts, const at::Tensor& ids, const at::Tensor& offsets,
                             const std::optional<at::Tensor>& weights, int64_t collisions, const std::string& operation,
                             bool mean) {
  const Parts p(parts, operation);
  const Bags bags(ids, offsets, weights);
  const Plan plan(p, bags, collisions, mean, false);
  auto out = at::empty({bags.num_bags, p.dim}, p.tensors[0].options());
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, bags.num_bags, bag_grain(bags, p.dim), [&](int64_t b0, int64_t b1) {
    forward_range(p, bags, plan, out_data, mean, b0, b1);
  });
  return out;
}

std::vector<at::Tensor> qr_pooled_backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& parts,
                                           const at::Tensor& ids, const at::Tensor& offsets,
                                           const std::optional<at::Tensor>& weights, int64_t collisions,
                                           const std::string& operation, bool mean) {
  const Parts p(parts, operation);
  const Bags bags(ids, offsets, weights);
  const auto grad = checked_grad(grad_out, p, bags);
  const Plan plan(p, bags, collisions, mean, true);
  return backward(grad, p, bags, plan);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> qr_grad_rows(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& parts, const at::Tensor& ids, const at::Tensor& offsets,
    const std::optional<at::Tensor>& weights, int64_t collisions, const std::string& operation, bool mean) {
  const Parts p(parts, operation);
  const Bags bags(ids, offsets, weights);
  const auto grad = checked_grad(grad_out, p, bags);
  const Plan plan(p, bags, collisions, mean, true);
  std::vector<at::Tensor> rows, values;
  for (int64_t j = 0; j < p.k; ++j) {
    auto [part_rows, part_values] = part_grad_rows(grad, p, bags, plan, j);
    rows.push_back(std::move(part_rows));
    values.push_back(std::move(part_values));
  }
  return {rows, values};
}

at::Tensor qr_weights_grad(const at::Tensor& grad_out, const std::vector<at::Tensor>& parts, const at::Tensor& ids,
                           const at::Tensor& offsets, int64_t collisions, const std::string& operation, bool mean) {
  const Parts p(parts, operation);
  const Bags bags(ids, offsets, std::nullopt);
  const auto grad = checked_grad(grad_out, p, bags);
  const Plan plan(p, bags, collisions, mean, true);  // no weights: scale = 1 / bag length for MEAN
  auto out = at::empty({bags.num_ids}, p.tensors[0].options());
  float* out_data = out.data_ptr<float>();
  const int64_t k = p.k, width = p.width, n = bags.num_ids;
  at::parallel_for(0, bags.num_bags, bag_grain(bags, p.dim), [&](int64_t b0, int64_t b1) {
    std::vector<const float*> row(k);
    std::vector<float> composed(width), scratch(width);
    for (int64_t i = bags.offsets[b0]; i < bags.offsets[b1]; ++i) {
      rows_of(p, plan, n, i, row.data());
      const float* g = grad.row(plan.bag[i]);
      float total = 0.0f;
      if (p.op == Operation::kConcat) {
        for (int64_t j = 0; j < k; ++j) {
          total += dot(g + j * width, row[j], width);
        }
      } else {
        std::fill(composed.begin(), composed.end(), 0.0f);
        add_composed(composed.data(), row.data(), k, p.op, 1.0f, width, scratch.data());
        total = dot(g, composed.data(), width);
      }
      out_data[i] = total * plan.scale[i];
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  using py::arg;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  module.doc() = "QR CPU kernels (see torchrec_pss_plugins.qr.cpu_kernels)";
  module.def("qr_pooled_forward", &qr_pooled_forward, no_gil, "Pooled QR embeddings: [B, d]", arg("parts"),
             arg("ids"), arg("offsets"), arg("weights"), arg("collisions"), arg("operation"), arg("mean"));
  module.def("qr_pooled_backward", &qr_pooled_backward, no_gil, "Dense part-table gradients: [rows_j, width] each",
             arg("grad_out"), arg("parts"), arg("ids"), arg("offsets"), arg("weights"), arg("collisions"),
             arg("operation"), arg("mean"));
  module.def("qr_grad_rows", &qr_grad_rows, no_gil,
             "Every part's gradient over the rows the batch reads: ([rows [U_j]], [values [U_j, width]])",
             arg("grad_out"), arg("parts"), arg("ids"), arg("offsets"), arg("weights"), arg("collisions"),
             arg("operation"), arg("mean"));
  module.def("qr_weights_grad", &qr_weights_grad, no_gil, "Gradient of the per-sample weights: [N]",
             arg("grad_out"), arg("parts"), arg("ids"), arg("offsets"), arg("collisions"), arg("operation"),
             arg("mean"));
}
