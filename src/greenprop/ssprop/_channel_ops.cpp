// ssProp's channel scoring as a CPU kernel, registered as a torch.library op.
//
//   greenprop::channel_abs_sum(t) -> float32 [C]: sum of |t| over dims 0 and 2 of a
//   contiguous (outer, C, inner) view of the output gradient (NCHW is (N, C, H*W),
//   channels_last and Linear rows are (rows, C, 1)), in one read of t and without the
//   temporary |t| tensor that PyTorch ops materialise.
// Built and loaded by greenprop/ssprop/kernels.py, which falls back to PyTorch ops.
// (A gather kernel was tried and dropped: it was no faster than index_select.)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;       // independent partial sums, so the compiler vectorises
constexpr int64_t kRowBlock = 512;  // rows summed in float before they join a double total

void check_view(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "greenprop channel ops run on CPU tensors only");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), "expected a contiguous (outer, C, inner) tensor");
}

// Sum of |p[0..n)| in float with kLanes partial sums.
template <typename T>
float abs_sum(const T* p, int64_t n) {
  float lanes[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += std::abs(static_cast<float>(p[i + l]));
  }
  float s = 0.f;
  for (; i < n; ++i) s += std::abs(static_cast<float>(p[i]));
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// (outer, C, inner > 1): each (outer, channel) plane is contiguous; sum planes in
// parallel, then add each channel's planes in double.
template <typename T>
void planes_abs_sum(const T* src, int64_t outer, int64_t c, int64_t inner, float* out) {
  std::vector<float> plane(outer * c);
  at::parallel_for(0, outer * c, std::max<int64_t>(1, 32768 / inner), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p) plane[p] = abs_sum(src + p * inner, inner);
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double s = 0.0;
    for (int64_t o = 0; o < outer; ++o) s += plane[o * c + ch];
    out[ch] = static_cast<float>(s);
  }
}

// (rows, C, 1): channels are contiguous within a row; every chunk of rows accumulates
// its own per-channel totals (float within a block of rows, double across blocks).
template <typename T>
void rows_abs_sum(const T* src, int64_t rows, int64_t c, float* out) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 64));
  std::vector<double> total(chunks * c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> block(c);
    for (int64_t chunk = b; chunk < e; ++chunk) {
      double* tot = total.data() + chunk * c;
      const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
      for (int64_t r = r0; r < r1; r += kRowBlock) {
        std::fill(block.begin(), block.end(), 0.f);
        for (int64_t rr = r; rr < std::min(r1, r + kRowBlock); ++rr) {
          const T* row = src + rr * c;
          for (int64_t ch = 0; ch < c; ++ch) block[ch] += std::abs(static_cast<float>(row[ch]));
        }
        for (int64_t ch = 0; ch < c; ++ch) tot[ch] += block[ch];
      }
    }
  });
  for (int64_t ch = 0; ch < c; ++ch) {
    double s = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) s += total[chunk * c + ch];
    out[ch] = static_cast<float>(s);
  }
}

at::Tensor channel_abs_sum(const at::Tensor& t) {
  check_view(t);
  const int64_t outer = t.size(0), c = t.size(1), inner = t.size(2);
  at::Tensor out = at::zeros({c}, t.options().dtype(at::kFloat));
  if (t.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "channel_abs_sum", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    if (inner == 1) {
      rows_abs_sum(src, outer, c, out.mutable_data_ptr<float>());
    } else {
      planes_abs_sum(src, outer, c, inner, out.mutable_data_ptr<float>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(greenprop, m) {
  m.def("channel_abs_sum(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(greenprop, CPU, m) {
  m.impl("channel_abs_sum", &channel_abs_sum);
}
