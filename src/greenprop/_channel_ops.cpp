// ssProp's channel ops and the row scatter ssProp and VCAS share, registered as torch.library ops.
//
//   greenprop::channel_abs_sum(t) -> float32 [C]: sum of |t| over dims 0 and 2 of a
//   contiguous (outer, C, inner) view of the output gradient (NCHW is (N, C, H*W),
//   channels_last and Linear rows are (rows, C, 1)), in one read of t and without the
//   temporary |t| tensor that PyTorch ops materialise.
//   greenprop::topk_channels(t, k, groups) -> int64 [groups * k]: the k channels of each
//   of `groups` equal blocks with the largest channel_abs_sum, ascending, in one call
//   (scores, selection and ordering without the five PyTorch ops and the sort of the
//   Python path). Ranking: larger score first, NaN above everything, and among equal
//   scores the lower index (what a stable descending sort gives); an O(C) partition.
//   greenprop::gather_channels(t, idx) -> (outer, k, inner): channels idx of the same
//   view, dense. Planes (inner > 1, NCHW) are copied as runs of consecutive kept
//   channels, one memcpy per run and outer row (index_select over dim 1 copies them
//   element by element); rows (inner == 1) element by element.
//   greenprop::scatter_rows_(out, idx, rows) -> out: out[idx[j]] = rows[j] and zeros in
//   every other row of a 2-D (n, m) matrix, each byte written once (what zeros_like
//   followed by index_copy_ does in two passes, the second one element by element).
//   greenprop::leverage_rows(dy, x, uniform, k, positions) -> (dy_k, x_k, finite): VCAS's
//   token draw for a Linear's weight gradient in one call (what greenprop/vcas/samplers.py
//   does in some twenty PyTorch ops, most of the time per-op overhead): the token scores
//   ||dy_t|| * ||x_t||, the soft top-k probabilities p = min(1, c * s) with sum p = k (the
//   same water level as samplers._water_level, in double, and its sort where that does not
//   settle), the Bernoulli draw against the uniform numbers Python drew (uniform < p), and
//   the kept rows of dy and x gathered, the narrower side scaled by 1/p. Zero scores are
//   never kept; with no more positive scores than k every positive one is kept with scale
//   1. positions (optional): the rows are tokens positions[t] of uniform.numel() tokens,
//   every other one of score zero. finite is false (and nothing drawn) where a score is
//   not finite: the Python path then raises its error.
// Built and loaded by greenprop/kernels.py, which falls back to PyTorch ops.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// Whether channel a ranks above channel b: larger score, NaN first, then lower index.
struct RanksAbove {
  const float* score;
  bool operator()(int64_t a, int64_t b) const {
    const float x = score[a], y = score[b];
    const bool nan_x = std::isnan(x), nan_y = std::isnan(y);
    if (nan_x != nan_y) return nan_x;
    if (!nan_x && x != y) return x > y;
    return a < b;
  }
};

at::Tensor topk_channels(const at::Tensor& t, int64_t k, int64_t groups) {
  check_view(t);
  const int64_t c = t.size(1);
  TORCH_CHECK(groups >= 1 && c % groups == 0, "groups=", groups, " does not divide ", c, " channels");
  const int64_t per_group = c / groups;
  TORCH_CHECK(k >= 1 && k <= per_group, "k must be in [1, ", per_group, "], got ", k);
  const at::Tensor scores = channel_abs_sum(t);
  const float* score = scores.const_data_ptr<float>();
  at::Tensor out = at::empty({groups * k}, t.options().dtype(at::kLong));
  int64_t* chosen = out.mutable_data_ptr<int64_t>();
  std::vector<int64_t> order(per_group);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * per_group;
    for (int64_t j = 0; j < per_group; ++j) order[j] = first + j;
    if (k < per_group) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), RanksAbove{score});
    std::sort(order.begin(), order.begin() + k);  // ascending indices keep the gathers cache-friendly
    std::copy(order.begin(), order.begin() + k, chosen + g * k);
  }
  return out;
}

// Checked int64 indices as a vector, each in [0, limit).
std::vector<int64_t> checked_indices(const at::Tensor& idx, int64_t limit) {
  TORCH_CHECK(idx.device().is_cpu() && idx.dim() == 1 && idx.scalar_type() == at::kLong,
              "expected a 1-D int64 CPU index tensor");
  const at::Tensor ix = idx.contiguous();
  const int64_t* p = ix.const_data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + ix.numel());
  for (int64_t i : out) TORCH_CHECK(i >= 0 && i < limit, "index ", i, " out of range [0, ", limit, ")");
  return out;
}

struct Run {
  int64_t src, dst, len;  // in channels
};

// Maximal runs of consecutive indices: idx = [2, 3, 4, 7] is runs (2, 0, 3), (7, 3, 1).
std::vector<Run> runs_of(const std::vector<int64_t>& idx) {
  std::vector<Run> runs;
  for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
    if (!runs.empty() && runs.back().src + runs.back().len == idx[j]) {
      ++runs.back().len;
    } else {
      runs.push_back({idx[j], j, 1});
    }
  }
  return runs;
}

// Rows of a (rows, C) matrix (channels_last, Linear): element by element, as an integer
// of the element's width (runs here are short, so a memcpy per run costs more).
template <typename Word>
void gather_columns(const void* src, void* dst, int64_t rows, int64_t c, const std::vector<int64_t>& idx) {
  const Word* s = static_cast<const Word*>(src);
  Word* d = static_cast<Word*>(dst);
  const int64_t k = static_cast<int64_t>(idx.size());
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, k)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Word* row = s + r * c;
      Word* out = d + r * k;
      for (int64_t j = 0; j < k; ++j) out[j] = row[idx[j]];
    }
  });
}

at::Tensor gather_channels(const at::Tensor& t, const at::Tensor& idx) {
  check_view(t);
  const int64_t outer = t.size(0), c = t.size(1), inner = t.size(2);
  const std::vector<int64_t> ix = checked_indices(idx, c);
  const int64_t k = static_cast<int64_t>(ix.size());
  at::Tensor out = at::empty({outer, k, inner}, t.options());
  if (out.numel() == 0) return out;
  const int64_t size = static_cast<int64_t>(t.element_size());
  if (inner == 1 && (size == 2 || size == 4 || size == 8)) {
    if (size == 2) gather_columns<uint16_t>(t.const_data_ptr(), out.mutable_data_ptr(), outer, c, ix);
    if (size == 4) gather_columns<uint32_t>(t.const_data_ptr(), out.mutable_data_ptr(), outer, c, ix);
    if (size == 8) gather_columns<uint64_t>(t.const_data_ptr(), out.mutable_data_ptr(), outer, c, ix);
    return out;
  }
  const std::vector<Run> runs = runs_of(ix);
  const int64_t row = inner * size;  // bytes per channel
  const char* src = static_cast<const char*>(t.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, outer, std::max<int64_t>(1, 32768 / (k * inner)), [&](int64_t b, int64_t e) {
    for (int64_t o = b; o < e; ++o) {
      const char* s = src + o * c * row;
      char* d = dst + o * k * row;
      for (const Run& r : runs) std::memcpy(d + r.dst * row, s + r.src * row, r.len * row);
    }
  });
  return out;
}

at::Tensor& scatter_rows_(at::Tensor& out, const at::Tensor& idx, const at::Tensor& rows) {
  TORCH_CHECK(out.device().is_cpu() && rows.device().is_cpu(), "greenprop channel ops run on CPU tensors only");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && rows.dim() == 2 && rows.is_contiguous(),
              "expected contiguous 2-D out and rows");
  TORCH_CHECK(out.scalar_type() == rows.scalar_type(), "out and rows differ in dtype");
  const int64_t n = out.size(0), m = out.size(1);
  const std::vector<int64_t> ix = checked_indices(idx, n);
  TORCH_CHECK(rows.size(0) == static_cast<int64_t>(ix.size()) && rows.size(1) == m,
              "rows must be (len(idx), out.size(1))");
  std::vector<int64_t> source(n, -1);  // row of `rows` that lands in each row of out
  for (int64_t j = 0; j < static_cast<int64_t>(ix.size()); ++j) source[ix[j]] = j;
  const int64_t bytes = m * static_cast<int64_t>(out.element_size());
  if (bytes == 0) return out;
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / bytes), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      if (source[r] >= 0) {
        std::memcpy(dst + r * bytes, src + source[r] * bytes, bytes);
      } else {
        std::memset(dst + r * bytes, 0, bytes);  // all-zero bits are 0.0 in every float type
      }
    }
  });
  return out;
}

// ||row|| of n elements, summed in Acc (float, double for double) with kLanes partial sums
// (within float rounding of torch's vector_norm, which also sums in the row's precision).
template <typename Acc, typename T>
Acc row_norm(const T* row, int64_t n) {
  Acc lanes[kLanes] = {Acc(0)};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const Acc v = static_cast<Acc>(row[i + l]);
      lanes[l] += v * v;
    }
  }
  Acc s = Acc(0);
  for (; i < n; ++i) s += static_cast<Acc>(row[i]) * static_cast<Acc>(row[i]);
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return std::sqrt(s);
}

constexpr int kWaterRounds = 8;  // samplers._WATER_ROUNDS
constexpr double kUnsettled = -1.0;

// samplers._water_level: the c of p = min(1, c * s), sum p = k, by the fixed point on the
// capped set (k below the count of positive scores); kUnsettled where the sort must decide.
double water_level(const std::vector<double>& s, double k, double sum, double highest) {
  int64_t m = 0;
  double tail = sum;
  for (int round = 0; round < kWaterRounds; ++round) {
    const double c = (k - static_cast<double>(m)) / tail;
    if (m == 0 && highest * c < 1.0) return c;
    int64_t count = 0;
    double uncapped = 0.0;
    for (double v : s) {
      if (v * c >= 1.0) {
        ++count;
      } else {
        uncapped += v;
      }
    }
    if (count == m) return c;
    if (count < m || static_cast<double>(count) >= k) return kUnsettled;
    m = count;
    tail = uncapped;
    if (tail <= 0.0) return kUnsettled;
  }
  return kUnsettled;
}

// samplers._water_level_sorted: the level c and the m largest scores (capped at 1) through
// one sort; `capped` marks those m.
double water_level_sorted(const std::vector<double>& s, double k, std::vector<char>& capped) {
  const int64_t n = static_cast<int64_t>(s.size());
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[a] > s[b]; });
  std::vector<double> tail(n);  // tail[i]: sum of the sorted scores from i on, added from the end
  double acc = 0.0;
  for (int64_t i = n - 1; i >= 0; --i) tail[i] = acc += s[order[i]];
  int64_t m = static_cast<int64_t>(std::ceil(k)) - 1;  // always fits
  for (int64_t i = 0; i < m; ++i) {
    if ((k - static_cast<double>(i)) * s[order[i]] <= tail[i]) {
      m = i;
      break;
    }
  }
  for (int64_t i = 0; i < m; ++i) capped[order[i]] = 1;
  return (k - static_cast<double>(m)) / tail[m];
}

// Rows `rows` of src (n wide) into dst, row j times scale[j] where scale is given.
template <typename T, typename P>
void gather_rows(const T* src, T* dst, int64_t n, const std::vector<int64_t>& rows, const P* scale) {
  const int64_t kept = static_cast<int64_t>(rows.size());
  at::parallel_for(0, kept, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const T* from = src + rows[j] * n;
      T* to = dst + j * n;
      if (scale == nullptr) {
        std::memcpy(to, from, n * sizeof(T));
      } else {
        const P f = scale[j];
        for (int64_t i = 0; i < n; ++i) to[i] = static_cast<T>(static_cast<P>(from[i]) * f);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, bool> leverage_rows(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                       const at::Tensor& uniform, double k,
                                                       const std::optional<at::Tensor>& positions) {
  TORCH_CHECK(dy_in.device().is_cpu() && x_in.device().is_cpu() && uniform.device().is_cpu(),
              "greenprop channel ops run on CPU tensors only");
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2 && dy_in.size(0) == x_in.size(0),
              "expected (T, out) and (T, in) token matrices");
  TORCH_CHECK(dy_in.scalar_type() == x_in.scalar_type(), "dy and x differ in dtype");
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous(), u = uniform.contiguous();
  const int64_t tokens = dy.size(0), out = dy.size(1), in = x.size(1);
  const int64_t total = u.numel();
  TORCH_CHECK(u.dim() == 1, "uniform must be 1-D");
  std::vector<int64_t> where;  // uniform number of each row
  if (positions.has_value()) {
    where = checked_indices(*positions, total);
    TORCH_CHECK(static_cast<int64_t>(where.size()) == tokens, "positions must give one position per row");
  } else {
    TORCH_CHECK(total == tokens, "uniform must hold one number per row");
    where.resize(tokens);
    std::iota(where.begin(), where.end(), 0);
  }
  TORCH_CHECK(k > 0.0 && k <= static_cast<double>(total), "k must be in (0, ", total, "], got ", k);
  at::Tensor dy_k, x_k;
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "leverage_rows", [&] {
    // The probabilities' dtype: float32, double for double (samplers._prob_dtype).
    using P = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(u.scalar_type() == c10::CppTypeToScalarType<P>::value, "uniform must be ",
                c10::CppTypeToScalarType<P>::value, " for ", dy.scalar_type(), " rows");
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    // Scores as _token_leverage gives them: each norm rounded to P, their product in P.
    std::vector<double> s(tokens);
    at::parallel_for(0, tokens, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, out + in)), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const P a = row_norm<P>(pdy + t * out, out), c = row_norm<P>(px + t * in, in);
        s[t] = static_cast<double>(a * c);
      }
    });
    double sum = 0.0, highest = 0.0;
    int64_t positive = 0;
    for (double v : s) {
      if (!std::isfinite(v)) {
        finite = false;
        return;
      }
      sum += v;
      highest = std::max(highest, v);
      positive += v > 0.0;
    }
    std::vector<int64_t> kept;
    std::vector<P> scale;
    const P* use_scale = nullptr;
    if (k >= static_cast<double>(positive)) {
      // Every positive score kept surely (scale 1); the uniform numbers are drawn but not needed.
      for (int64_t t = 0; t < tokens; ++t) {
        if (s[t] > 0.0) kept.push_back(t);
      }
    } else {
      std::vector<char> capped(tokens, 0);
      double c = water_level(s, k, sum, highest);
      if (c == kUnsettled) c = water_level_sorted(s, k, capped);
      const P* pu = u.const_data_ptr<P>();
      for (int64_t t = 0; t < tokens; ++t) {
        const P p = capped[t] ? P(1) : static_cast<P>(std::min(1.0, c * s[t]));
        if (pu[where[t]] < p) {  // p = 0 (a zero score) never passes: uniform numbers are >= 0
          kept.push_back(t);
          scale.push_back(P(1) / p);
        }
      }
      use_scale = scale.data();
    }
    const int64_t n_kept = static_cast<int64_t>(kept.size());
    dy_k = at::empty({n_kept, out}, dy.options());
    x_k = at::empty({n_kept, in}, x.options());
    // Either side scaled gives the same estimate; the narrower one is fewer multiplications.
    const bool scale_dy = out <= in;
    gather_rows<scalar_t, P>(pdy, dy_k.mutable_data_ptr<scalar_t>(), out, kept, scale_dy ? use_scale : nullptr);
    gather_rows<scalar_t, P>(px, x_k.mutable_data_ptr<scalar_t>(), in, kept, scale_dy ? nullptr : use_scale);
  });
  if (!finite) {
    dy_k = at::empty({0, out}, dy.options());
    x_k = at::empty({0, in}, x.options());
  }
  return std::make_tuple(dy_k, x_k, finite);
}

}  // namespace

TORCH_LIBRARY(greenprop, m) {
  m.def("channel_abs_sum(Tensor t) -> Tensor");
  m.def("topk_channels(Tensor t, int k, int groups) -> Tensor");
  m.def("gather_channels(Tensor t, Tensor idx) -> Tensor");
  m.def("scatter_rows_(Tensor(a!) out, Tensor idx, Tensor rows) -> Tensor(a!)");
  m.def("leverage_rows(Tensor dy, Tensor x, Tensor uniform, float k, Tensor? positions) -> (Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(greenprop, CPU, m) {
  m.impl("channel_abs_sum", &channel_abs_sum);
  m.impl("topk_channels", &topk_channels);
  m.impl("gather_channels", &gather_channels);
  m.impl("scatter_rows_", &scatter_rows_);
  m.impl("leverage_rows", &leverage_rows);
}
