// nezha-recommend ARTIFACT --history 12,55,102 [--history ...] -k 10 [--beam N] [--precision P]
//                 [--unknown error|skip] [--threads N] [--json]
// The same output as `nezha recommend` (runtime/cli.py): a table, or with --json the same JSON document.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "nezha/recommender.h"

namespace {

const char* kUsage =
    "usage: nezha-recommend ARTIFACT --history ITEMS [--history ITEMS ...] [-k K] [--beam BEAM]\n"
    "                       [--precision P] [--unknown {error,skip}] [--threads N] [--onnxruntime-library PATH] [--json]\n";

const char* kHelp =
    "Recommend the next items for item-id histories with an artifact folder (the C++ runtime).\n\n"
    "  ARTIFACT                   artifact folder written by python export/build.py\n"
    "  --history ITEMS            comma-separated item ids, oldest first; repeat for a batch\n"
    "  -k, --k K                  items per history (default 10)\n"
    "  --beam BEAM                beam width (default max(k, 20), at most the artifact's max_beam)\n"
    "  --precision P              fp32, int8-cpu ... (default: the artifact's first)\n"
    "  --unknown {error,skip}     policy for unknown item ids (default error)\n"
    "  --threads N                ONNX Runtime intra-op threads per session (default: its own choice)\n"
    "  --onnxruntime-library PATH libonnxruntime.so.1 to open (default: $NEZHA_ONNXRUNTIME_LIBRARY, then the build's)\n"
    "  --json                     print JSON instead of a table\n";

struct UsageError {
  std::string message;
};

// Like runtime/cli.py: every comma-separated field, stripped of whitespace, is plain ASCII digits.
bool parse_digits(std::string s, long long& out) {
  const auto space = " \t\n\r\f\v";
  const std::size_t a = s.find_first_not_of(space), b = s.find_last_not_of(space);
  if (a == std::string::npos) return false;
  s = s.substr(a, b - a + 1);
  for (char c : s)
    if (c < '0' || c > '9') return false;
  errno = 0;
  out = std::strtoll(s.c_str(), nullptr, 10);
  return errno == 0;
}

std::vector<std::int64_t> parse_history(const std::string& text) {
  std::vector<std::int64_t> items;
  std::size_t start = 0;
  while (true) {
    const std::size_t end = text.find(',', start);
    long long v;
    if (!parse_digits(text.substr(start, end == std::string::npos ? std::string::npos : end - start), v))
      throw UsageError{"argument --history: history '" + text + "' must be comma-separated item ids in ASCII digits (e.g. 12,55,102)"};
    items.push_back(v);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return items;
}

// An integer option in ASCII digits, as runtime/cli.py's ascii_int: an optional '-', then digits.
bool parse_int(const std::string& s, long long& out) {
  const std::size_t digits = !s.empty() && s[0] == '-' ? 1 : 0;
  if (digits == s.size()) return false;
  for (std::size_t i = digits; i < s.size(); ++i)
    if (s[i] < '0' || s[i] > '9') return false;
  errno = 0;
  out = std::strtoll(s.c_str(), nullptr, 10);
  return errno == 0;
}

int parse_count(const std::string& option, const std::string& text) {
  long long v;
  if (!parse_int(text, v) || v < -2147483647LL || v > 2147483647LL)
    throw UsageError{"argument " + option + ": '" + text + "' is not an integer in ASCII digits"};
  return int(v);
}

// Python's repr(round(x, 6)) for a float32 score (what json.dumps writes).
std::string json_score(float score) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6f", double(score));
  const double rounded = std::strtod(buf, nullptr);
  if (std::isinf(rounded)) return rounded > 0 ? "Infinity" : "-Infinity";
  if (std::isnan(rounded)) return "NaN";
  if (rounded == 0) return std::signbit(rounded) ? "-0.0" : "0.0";
  std::string mantissa;
  int exponent = 0;
  for (int precision = 0; precision <= 17; ++precision) {     // the shortest digits that read back exactly
    std::snprintf(buf, sizeof buf, "%.*e", precision, rounded);
    if (std::strtod(buf, nullptr) == rounded) break;
  }
  const std::string e(buf);
  const std::size_t epos = e.find('e');
  exponent = std::atoi(e.c_str() + epos + 1);
  const bool negative = e[0] == '-';
  for (std::size_t i = negative ? 1 : 0; i < epos; ++i)
    if (e[i] != '.') mantissa += e[i];
  while (mantissa.size() > 1 && mantissa.back() == '0') mantissa.pop_back();
  const int decpt = exponent + 1, n = int(mantissa.size());
  std::string out = negative ? "-" : "";
  if (decpt <= -4 || decpt > 16) {                              // Python's repr switches to exponent form
    out += mantissa.substr(0, 1);
    if (n > 1) out += "." + mantissa.substr(1);
    std::snprintf(buf, sizeof buf, "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    return out + buf;
  }
  if (decpt <= 0) return out + "0." + std::string(std::size_t(-decpt), '0') + mantissa;
  if (decpt >= n) return out + mantissa + std::string(std::size_t(decpt - n), '0') + ".0";
  return out + mantissa.substr(0, std::size_t(decpt)) + "." + mantissa.substr(std::size_t(decpt));
}

void print_json(const std::vector<std::vector<std::int64_t>>& histories, const std::vector<std::vector<nezha::ScoredItem>>& results) {
  std::string out = "[";
  for (std::size_t b = 0; b < histories.size(); ++b) {
    out += std::string(b ? "," : "") + "\n  {\n    \"history\": [";
    for (std::size_t i = 0; i < histories[b].size(); ++i) out += std::string(i ? "," : "") + "\n      " + std::to_string(histories[b][i]);
    out += histories[b].empty() ? "]" : "\n    ]";
    out += ",\n    \"items\": [";
    for (std::size_t i = 0; i < results[b].size(); ++i)
      out += std::string(i ? "," : "") + "\n      {\n        \"item\": " + std::to_string(results[b][i].item) +
             ",\n        \"score\": " + json_score(results[b][i].score) + "\n      }";
    out += results[b].empty() ? "]" : "\n    ]";
    out += "\n  }";
  }
  out += histories.empty() ? "]" : "\n]";
  std::cout << out << "\n";
}

void print_table(const std::vector<std::vector<std::int64_t>>& histories, const std::vector<std::vector<nezha::ScoredItem>>& results) {
  for (std::size_t b = 0; b < histories.size(); ++b) {
    std::string h;
    for (std::size_t i = 0; i < histories[b].size(); ++i) h += (i ? "," : "") + std::to_string(histories[b][i]);
    std::printf("history %s\n", h.c_str());
    for (std::size_t r = 0; r < results[b].size(); ++r)
      std::printf("  %3d  item %-10lld score %.4f\n", int(r + 1), static_cast<long long>(results[b][r].item), double(results[b][r].score));
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  std::string artifact;
  std::vector<std::vector<std::int64_t>> histories;
  int k = 10, beam = 0;
  bool json = false, beam_set = false;
  nezha::Options options;
  nezha::Unknown unknown = nezha::Unknown::error;
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    for (std::size_t i = 0; i < args.size(); ++i) {
      std::string a = args[i], value;
      const bool is_option = a.size() > 1 && a[0] == '-' && !(a[1] >= '0' && a[1] <= '9');
      if (a == "-h" || a == "--help") {
        std::cout << kUsage << "\n" << kHelp;
        return 0;
      }
      if (!is_option) {
        if (!artifact.empty()) throw UsageError{"unrecognized arguments: " + a};
        artifact = a;
        continue;
      }
      if (a == "--json") {
        json = true;
        continue;
      }
      if (a.rfind("--", 0) == 0 && a.find('=') != std::string::npos) {
        value = a.substr(a.find('=') + 1);
        a = a.substr(0, a.find('='));
      } else if (a.rfind("-k", 0) == 0 && a.size() > 2 && a[1] == 'k') {
        value = a.substr(2);
        a = "-k";
      } else {
        static const char* kValued[] = {"--history", "-k", "--k", "--beam", "--precision", "--unknown", "--threads",
                                        "--onnxruntime-library", "--backend", "--device"};
        bool known = false;
        for (const char* v : kValued) known = known || a == v;
        if (!known) throw UsageError{"unrecognized arguments: " + a};
        if (i + 1 >= args.size()) throw UsageError{"argument " + a + ": expected one argument"};
        value = args[++i];
      }
      if (a == "--history") histories.push_back(parse_history(value));
      else if (a == "-k" || a == "--k") k = parse_count("-k/--k", value);
      else if (a == "--beam") {
        beam = parse_count("--beam", value);
        beam_set = true;
      }
      else if (a == "--precision") options.precision = value;
      else if (a == "--threads") options.intra_op_threads = parse_count("--threads", value);
      else if (a == "--onnxruntime-library") options.onnxruntime_library = value;
      else if (a == "--unknown") {
        if (value != "error" && value != "skip") throw UsageError{"argument --unknown: invalid choice: '" + value + "' (choose from 'error', 'skip')"};
        unknown = value == "skip" ? nezha::Unknown::skip : nezha::Unknown::error;
      } else if (a == "--backend") {
        if (value != "onnxruntime") throw UsageError{"argument --backend: the C++ runtime runs onnxruntime only, got '" + value + "'"};
      } else if (a == "--device") {
        if (value != "cpu") throw UsageError{"argument --device: the C++ runtime runs on cpu only, got '" + value + "'"};
      } else {
        throw UsageError{"unrecognized arguments: " + a};
      }
    }
    if (artifact.empty()) throw UsageError{"the following arguments are required: artifact"};
    if (histories.empty()) throw UsageError{"the following arguments are required: --history"};
  } catch (const UsageError& e) {
    std::cerr << "nezha-recommend: error: " << e.message << " (see --help)\n";
    return 2;
  }
  try {
    auto rec = nezha::Recommender::load(artifact, options);
    if (!beam_set) beam = rec->default_beam(k);
    else if (beam < 1)                            // 0 means "default" in the library; here it was asked for
      throw nezha::Error("beam must be an integer in 1.." + std::to_string(rec->max_beam()) + " (the artifact's max_beam), got " + std::to_string(beam));
    const auto results = rec->recommend(histories, k, beam, unknown);
    if (json) print_json(histories, results);
    else print_table(histories, results);
  } catch (const nezha::Error& e) {
    std::cerr << "nezha-recommend: error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
