// What the C++ benchmarks share: the command line, the timer (warm-up, then the median of the
// repeats of std::chrono wall time) and the small formatting helpers. Not a test: no thresholds.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace archext_bench {

struct Settings {
  int warmup;
  int repeats;
  bool quick = false;
  int64_t rows = 0, cols = 0;  // --shape ROWSxCOLS, where the benchmark takes one
  bool shape_given = false;
};

inline void usage(const char* argv0, bool takes_shape) {
  std::fprintf(stderr, "usage: %s [--quick]%s [--repeats N] [--warmup N]\n", argv0,
               takes_shape ? " [--shape ROWSxCOLS]" : "");
}

// Parses --quick (1 warm-up, 5 repeats), --repeats N, --warmup N and, when takes_shape,
// --shape ROWSxCOLS into s. Returns -1 to go on, else the exit status for main (0 after --help,
// 2 on a bad argument, with the usage line).
inline int parse_args(int argc, char** argv, Settings& s, bool takes_shape) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") {
      s.quick = true;
      s.warmup = 1;
      s.repeats = 5;
    } else if (takes_shape && a == "--shape" && i + 1 < argc) {
      long long r = 0, c = 0;
      if (std::sscanf(argv[++i], "%lldx%lld", &r, &c) != 2 || r < 1 || c < 1) {
        usage(argv[0], takes_shape);
        return 2;
      }
      s.rows = r;
      s.cols = c;
      s.shape_given = true;
    } else if ((a == "--repeats" || a == "--warmup") && i + 1 < argc) {
      const int v = std::atoi(argv[++i]);
      if (v < (a == "--repeats" ? 1 : 0)) {
        usage(argv[0], takes_shape);
        return 2;
      }
      (a == "--repeats" ? s.repeats : s.warmup) = v;
    } else if (a == "--help" || a == "-h") {
      usage(argv[0], takes_shape);
      return 0;
    } else {
      usage(argv[0], takes_shape);
      return 2;
    }
  }
  return -1;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t k = v.size() / 2;
  return v.size() % 2 ? v[k] : 0.5 * (v[k - 1] + v[k]);
}

// Median wall time of fn in milliseconds, after s.warmup untimed calls.
inline double time_ms(const Settings& s, const std::function<void()>& fn) {
  for (int i = 0; i < s.warmup; ++i) fn();
  std::vector<double> t;
  t.reserve(static_cast<size_t>(s.repeats));
  for (int i = 0; i < s.repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    t.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return median(std::move(t));
}

inline double gbps(double bytes, double ms) { return bytes / (ms * 1e-3) / 1e9; }

inline const char* dtype_name(at::ScalarType t) {
  return t == at::kBFloat16 ? "bfloat16" : t == at::kHalf ? "float16" : "float32";
}

}  // namespace archext_bench
