// A batch of bags for the methods' C++ CPU kernels: ids [N], offsets [B + 1], optional per-sample weights [N],
// checked once (each failure names the value), plus the task size the kernels hand to at::parallel_for.

#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace torchrec_pss {

struct Bags {
  at::Tensor ids_t, offsets_t, weights_t;
  const int64_t* ids;
  const int64_t* offsets;
  const float* weights;
  int64_t num_bags, num_ids;

  Bags(const at::Tensor& ids_, const at::Tensor& offsets_, const std::optional<at::Tensor>& weights_) {
    TORCH_CHECK(ids_.device().is_cpu() && offsets_.device().is_cpu(), "ids and offsets must be CPU tensors");
    TORCH_CHECK(!ids_.is_floating_point() && !offsets_.is_floating_point(), "ids and offsets must be integer tensors");
    TORCH_CHECK(ids_.dim() == 1, "ids must be 1-D [N], got ", ids_.sizes());
    TORCH_CHECK(offsets_.dim() == 1 && offsets_.numel() >= 1, "offsets must be 1-D [B + 1], got ", offsets_.sizes());
    ids_t = ids_.to(at::kLong).contiguous();
    offsets_t = offsets_.to(at::kLong).contiguous();
    ids = ids_t.data_ptr<int64_t>();
    offsets = offsets_t.data_ptr<int64_t>();
    num_bags = offsets_t.numel() - 1;
    num_ids = ids_t.numel();
    TORCH_CHECK(offsets[0] == 0 && offsets[num_bags] == num_ids, "offsets must run from 0 to the number of ids (",
                num_ids, "), got ", offsets[0], " ... ", offsets[num_bags]);
    for (int64_t b = 0; b < num_bags; ++b) {
      TORCH_CHECK(offsets[b] <= offsets[b + 1], "offsets must be non-decreasing (offsets[", b, "] = ", offsets[b],
                  " > offsets[", b + 1, "] = ", offsets[b + 1], ")");
    }
    weights = nullptr;
    if (weights_.has_value() && weights_->defined()) {
      TORCH_CHECK(weights_->device().is_cpu() && weights_->dim() == 1 && weights_->numel() == num_ids,
                  "per-sample weights must be a 1-D CPU tensor [N] with one entry per id (N = ", num_ids, "), got ",
                  weights_->sizes());
      weights_t = weights_->to(at::kFloat).contiguous();
      weights = weights_t.data_ptr<float>();
    }
  }

  float weight(int64_t i) const { return weights == nullptr ? 1.0f : weights[i]; }
};

// The rows of a gradient grad_out [B, d] as float32 with a unit column stride: row b starts at row(b). Read in
// place when the columns are unit-strided (any row stride: a column slice of a wider gradient, or 0 for the
// expanded gradient of a sum); otherwise the one row of a row-stride-0 gradient, or the whole gradient, is copied.
struct GradRows {
  at::Tensor tensor;  // keeps the rows alive
  const float* data;
  int64_t stride;
  const float* row(int64_t b) const { return data + b * stride; }
};

inline GradRows grad_rows(const at::Tensor& grad_out) {
  at::Tensor g = grad_out.to(at::kFloat);
  if (g.size(1) > 1 && g.stride(1) != 1) {
    g = g.size(0) > 0 && g.stride(0) == 0 ? g.narrow(0, 0, 1).contiguous().expand(g.sizes()) : g.contiguous();
  }
  return {g, g.data_ptr<float>(), g.stride(0)};
}

// Bags per task of at::parallel_for: about 16k elements read per task.
inline int64_t bag_grain(const Bags& bags, int64_t dim) {
  const int64_t per_bag = std::max<int64_t>(1, (bags.num_ids / std::max<int64_t>(bags.num_bags, 1)) * dim);
  return std::max<int64_t>(1, 16384 / per_bag);
}

}  // namespace torchrec_pss
