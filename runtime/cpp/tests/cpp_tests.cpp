// C++ tests of the runtime: nezha_cpp_tests ARTIFACT [TEST ...] (or ctest with NEZHA_TEST_ARTIFACT set)
// ARTIFACT is a valid artifact (format version 4; tests/cpp_helpers.py builds a tiny one); each refusal test
// copies it, breaks one thing and expects nezha::Error with a message naming the problem. Also: the
// .npy reader, sha256, request policies, N threads == serial, and zero allocation in the steady state
// (a malloc hook counting this thread's allocations outside ONNX Runtime's own calls).
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "files.h"
#include "manifest.h"
#include "nezha/nezha_c.h"
#include "nezha/recommender.h"
#include "npy.h"
#include "ort.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

// --- counting allocator: every malloc-family call of the process goes through here --------------------

#ifndef NEZHA_SANITIZE          // the sanitizers own malloc; the allocation test is skipped under them
namespace {
thread_local bool t_counting = false;
thread_local long t_ours = 0;    // this thread, outside ONNX Runtime
thread_local long t_ort = 0;     // this thread, inside ONNX Runtime calls (reported, not ours to prove)
inline void count_one() {
  if (!t_counting) return;
  if (nezha::detail::ort_call_depth > 0) ++t_ort;
  else ++t_ours;
}
}  // namespace

extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void __libc_free(void*);

void* malloc(size_t n) {
  count_one();
  return __libc_malloc(n);
}
void* calloc(size_t n, size_t m) {
  count_one();
  return __libc_calloc(n, m);
}
void* realloc(void* p, size_t n) {
  count_one();
  return __libc_realloc(p, n);
}
void* memalign(size_t a, size_t n) {
  count_one();
  return __libc_memalign(a, n);
}
void* aligned_alloc(size_t a, size_t n) {
  count_one();
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, size_t a, size_t n) {
  count_one();
  *out = __libc_memalign(a, n);
  return *out ? 0 : 12;  // ENOMEM
}
void free(void* p) { __libc_free(p); }
}
#endif

// --- a tiny test harness ------------------------------------------------------------------------------

namespace {

std::string g_artifact;
int g_failures = 0;
std::string g_current;

struct Failure {
  std::string message;
};

#define CHECK(cond)                                                                                   \
  do {                                                                                                \
    if (!(cond)) throw Failure{std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": " #cond}; \
  } while (0)

// `f` must throw nezha::Error whose message contains `needle`.
void expect_error(const std::function<void()>& f, const std::string& needle, int line) {
  try {
    f();
  } catch (const nezha::Error& e) {
    if (std::string(e.what()).find(needle) == std::string::npos)
      throw Failure{"line " + std::to_string(line) + ": error message lacks '" + needle + "': " + e.what()};
    return;
  } catch (const std::exception& e) {
    throw Failure{"line " + std::to_string(line) + ": expected nezha::Error, got another exception: " + e.what()};
  }
  throw Failure{"line " + std::to_string(line) + ": expected nezha::Error containing '" + needle + "', nothing was thrown"};
}
#define EXPECT_ERROR(expr, needle) expect_error([&] { expr; }, needle, __LINE__)

fs::path g_tmp;

// A fresh copy of the test artifact.
fs::path copy_artifact(const std::string& name) {
  const fs::path dst = g_tmp / name;
  fs::remove_all(dst);
  fs::copy(g_artifact, dst, fs::copy_options::recursive);
  return dst;
}

json read_manifest(const fs::path& dir) { return json::parse(nezha::read_file((dir / "manifest.json").string())); }

void write_manifest(const fs::path& dir, const json& m) { std::ofstream(dir / "manifest.json") << m.dump(2); }

// Edit the manifest of a copy; rehash `files` for the listed paths.
void edit(const fs::path& dir, const std::function<void(json&)>& change, const std::vector<std::string>& rehash = {}) {
  json m = read_manifest(dir);
  change(m);
  for (const auto& rel : rehash) m["files"][rel] = nezha::sha256_file((dir / rel).string());
  write_manifest(dir, m);
}

// Re-record contract.json for the manifest as it stands: a test that edits the manifest on purpose to
// reach a check behind the contract (the graphs' own interface, engines).
void rebind(const fs::path& dir) {
  const nezha::Manifest parsed = nezha::parse_manifest(nezha::read_file((dir / "manifest.json").string()), "test");
  std::ofstream(dir / nezha::kContract) << json(parsed.contract).dump();
  edit(dir, [](json&) {}, {nezha::kContract});
}

std::unique_ptr<nezha::Recommender> load(const fs::path& dir, nezha::Options o = {}) {
  if (o.intra_op_threads == 0) o.intra_op_threads = 1;
  return nezha::Recommender::load(dir.string(), o);
}

// A .npy file holding `values` with the given descr and shape text.
void write_npy(const fs::path& path, const std::string& descr, const std::string& shape, const std::vector<std::uint64_t>& values,
               int major = 1, bool fortran = false) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") + ", 'shape': " + shape + ", }";
  const std::size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string bytes = "\x93NUMPY";
  bytes += char(major);
  bytes += char(0);
  const std::size_t n = header.size();
  bytes += char(n & 255);
  bytes += char((n >> 8) & 255);
  if (major == 2) {
    bytes += char((n >> 16) & 255);
    bytes += char((n >> 24) & 255);
  }
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(values.data()), values.size() * 8);
  std::ofstream(path, std::ios::binary) << bytes;
}

std::vector<std::uint64_t> npy_values(const fs::path& path) {
  return nezha::parse_npy(nezha::read_file(path.string()), path.string()).data;
}

std::vector<std::int64_t> catalog_items(const fs::path& dir) {
  std::vector<std::int64_t> out;
  for (std::uint64_t v : npy_values(dir / read_manifest(dir)["tables"]["item_ids"]["file"].get<std::string>())) out.push_back(std::int64_t(v));
  return out;
}

// Histories drawn from the catalog, lengths 1..max_len (deterministic).
std::vector<std::vector<std::int64_t>> histories(const std::vector<std::int64_t>& items, int n, int max_len, unsigned seed = 7) {
  std::vector<std::vector<std::int64_t>> out;
  unsigned x = seed;
  auto next = [&] { return x = x * 1103515245u + 12345u, (x >> 8); };
  for (int b = 0; b < n; ++b) {
    std::vector<std::int64_t> h;
    const int len = 1 + int(next() % unsigned(max_len));
    for (int i = 0; i < len; ++i) h.push_back(items[next() % items.size()]);
    out.push_back(h);
  }
  return out;
}

// Same items in the same order, scores within `tolerance` (0: bitwise; a padded batch may differ in the
// last bits from a single history, as in the Python runtime).
bool same(const std::vector<std::vector<nezha::ScoredItem>>& a, const std::vector<std::vector<nezha::ScoredItem>>& b,
          float tolerance = 0) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].size() != b[i].size()) return false;
    for (std::size_t j = 0; j < a[i].size(); ++j)
      if (a[i][j].item != b[i][j].item || std::abs(a[i][j].score - b[i][j].score) > tolerance) return false;
  }
  return true;
}

// --- tests --------------------------------------------------------------------------------------------

void test_loads_and_recommends() {
  auto rec = load(g_artifact);
  const auto items = catalog_items(g_artifact);
  const auto r = rec->recommend({{items[0], items[1]}}, 3, 8);
  CHECK(r.size() == 1 && !r[0].empty() && r[0].size() <= 3);
  for (std::size_t j = 1; j < r[0].size(); ++j) CHECK(r[0][j - 1].score >= r[0][j].score);
  CHECK(rec->verifier_kinds().size() == std::size_t(rec->levels()));
}

void test_sha256() {
  const fs::path p = g_tmp / "abc.txt";
  std::ofstream(p) << "abc";
  CHECK(nezha::sha256_file(p.string()) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

void test_refuses_a_bad_checksum() {
  const fs::path d = copy_artifact("bad-checksum");
  const std::string rel = read_manifest(d)["tables"]["sid_items"]["file"];
  {
    std::fstream f(d / rel, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x7f');
  }
  EXPECT_ERROR(load(d), rel + ": sha256 mismatch");
  nezha::Options o;
  o.verify = false;                                  // unverified, the broken table still fails its invariant
  EXPECT_ERROR(load(d, o), "sid_items");
}

void test_refuses_a_missing_file() {
  const fs::path d = copy_artifact("missing-file");
  const std::string rel = read_manifest(d)["graphs"]["fp32"]["head_0"]["file"];
  fs::remove(d / rel);
  EXPECT_ERROR(load(d), rel + ": missing");
}

void test_refuses_paths_outside_the_folder() {
  const fs::path d = copy_artifact("dotdot");
  edit(d, [](json& m) { m["tables"]["item_ids"]["file"] = "tables/../../outside.npy"; });
  EXPECT_ERROR(load(d), "has a '..' segment");
  const fs::path a = copy_artifact("absolute");
  edit(a, [](json& m) { m["validation"] = "/etc/passwd"; });
  EXPECT_ERROR(load(a), "is absolute");
  const fs::path e = copy_artifact("empty-segment");
  edit(e, [](json& m) {
    json files = m["files"];
    const std::string rel = m["tables"]["item_ids"]["file"];
    m["files"][rel.substr(0, rel.find('/')) + "//" + rel.substr(rel.find('/') + 1)] = files[rel];
  });
  EXPECT_ERROR(load(e), "empty segment");
  const fs::path b = copy_artifact("backslash");
  edit(b, [](json& m) { m["validation"] = "tables\\x.json"; });
  EXPECT_ERROR(load(b), "backslash");
}

void test_refuses_links_out_and_fifos_anywhere_in_the_folder() {
  const fs::path d = copy_artifact("stray-link");
  fs::create_symlink("/etc/passwd", d / "graphs" / "stray.onnx.data");      // not in the manifest: still refused
  EXPECT_ERROR(load(d), "outside the artifact folder");
  const fs::path f = copy_artifact("fifo");
  CHECK(mkfifo((f / "graphs" / "weights.data").c_str(), 0600) == 0);
  EXPECT_ERROR(load(f), "graphs/weights.data: not a regular file or folder");
  const fs::path m = copy_artifact("manifest-link");
  fs::rename(m / "manifest.json", g_tmp / "outside-manifest.json");
  fs::create_symlink(g_tmp / "outside-manifest.json", m / "manifest.json");
  EXPECT_ERROR(load(m), "outside the artifact folder");
}

void test_refuses_a_symlink_outside_but_follows_one_inside() {
  const fs::path d = copy_artifact("symlink-outside");
  const std::string rel = read_manifest(d)["tables"]["item_codes"]["file"];
  const fs::path outside = g_tmp / "outside-item_codes.npy";
  fs::copy_file(d / rel, outside, fs::copy_options::overwrite_existing);
  fs::remove(d / rel);
  fs::create_symlink(outside, d / rel);              // same bytes, same sha256: only containment can refuse it
  EXPECT_ERROR(load(d), "outside the artifact folder");
  fs::remove(d / rel);
  fs::create_symlink(fs::path("..") / ".." / outside.filename(), d / rel);   // relative, through ..
  EXPECT_ERROR(load(d), "outside the artifact folder");

  const fs::path ok = copy_artifact("symlink-inside");
  fs::rename(ok / rel, ok / "moved.npy");
  fs::create_symlink(fs::path("..") / "moved.npy", ok / rel);
  edit(ok, [](json& m) { m["files"]["moved.npy"] = m["files"]["validation.json"]; }, {"moved.npy"});
  CHECK(load(ok) != nullptr);
}

void test_refuses_wrong_table_dtype_and_shape() {
  const fs::path d = copy_artifact("dtype");
  edit(d, [](json& m) { m["tables"]["item_ids"]["dtype"] = "uint64"; });
  rebind(d);                                       // forged: the table reader still refuses it
  EXPECT_ERROR(load(d), "the format requires int64");
  const fs::path s = copy_artifact("shape");
  edit(s, [](json& m) { m["tables"]["item_codes"]["shape"][1] = 7; });
  rebind(s);
  EXPECT_ERROR(load(s), "table item_codes");
  // The file disagrees with the manifest: a float64 .npy, a Fortran-order one, a shorter one.
  const fs::path f = copy_artifact("npy-float");
  const std::string rel = read_manifest(f)["tables"]["sid_keys"]["file"];
  const auto keys = npy_values(f / rel);
  write_npy(f / rel, "<f8", "(" + std::to_string(keys.size()) + ",)", keys);
  edit(f, [](json&) {}, {rel});
  EXPECT_ERROR(load(f), "dtype '<f8'");
  write_npy(f / rel, "<u8", "(" + std::to_string(keys.size()) + ",)", keys, 1, true);
  edit(f, [](json&) {}, {rel});
  EXPECT_ERROR(load(f), "Fortran-order");
  write_npy(f / rel, ">u8", "(" + std::to_string(keys.size()) + ",)", keys);
  edit(f, [](json&) {}, {rel});
  EXPECT_ERROR(load(f), "dtype '>u8'");
  std::vector<std::uint64_t> shorter(keys.begin(), keys.end() - 1);
  write_npy(f / rel, "<u8", "(" + std::to_string(shorter.size()) + ",)", shorter);
  edit(f, [](json&) {}, {rel});
  EXPECT_ERROR(load(f), "the file holds uint64");
  write_npy(f / rel, "<u8", "(" + std::to_string(keys.size()) + ",)", keys, 2);      // format 2.0 reads fine
  edit(f, [](json&) {}, {rel});
  CHECK(load(f) != nullptr);
}

void test_npy_reader_is_strict() {
  EXPECT_ERROR(nezha::parse_npy("not numpy", "x"), "bad magic");
  std::string v3 = "\x93NUMPY\x03";
  v3 += std::string("\x00\x00\x00", 3);
  EXPECT_ERROR(nezha::parse_npy(v3 + std::string(40, ' '), "x"), "format 3.0");
  const fs::path p = g_tmp / "t.npy";
  write_npy(p, "<i8", "(2, 3)", {1, 2, 3, 4, 5, 6});
  const auto a = nezha::parse_npy(nezha::read_file(p.string()), "t");
  CHECK(a.dtype == "int64" && a.shape == (std::vector<std::int64_t>{2, 3}) && a.data[5] == 6);
  std::string bytes = nezha::read_file(p.string());
  EXPECT_ERROR(nezha::parse_npy(bytes.substr(0, bytes.size() - 3), "t"), "data bytes");
  EXPECT_ERROR(nezha::parse_npy(bytes.substr(0, 20), "t"), "truncated");
}

void test_refuses_broken_table_invariants() {
  struct Case {
    const char* table;
    std::function<void(std::vector<std::uint64_t>&)> mutate;
    const char* message;
  };
  const std::vector<Case> cases = {
      {"item_ids", [](auto& v) { std::swap(v[0], v[1]); }, "item_ids is not strictly ascending"},
      {"item_codes", [](auto& v) { v[0] = 1000000; }, "outside 0.."},
      {"sid_keys", [](auto& v) { std::swap(v[0], v[1]); }, "sid_keys is not strictly ascending"},
      {"sid_offsets", [](auto& v) { v.back() -= 1; }, "sid_offsets must start at 0 and end at"},
      {"sid_items", [](auto& v) { v[0] = std::uint64_t(-5); }, "sid_items"},
      {"valid_prefixes_0", [](auto& v) { std::swap(v[0], v[1]); }, "valid_prefixes_0: not the sorted keys of every item's first 1 codes"},
      {"valid_prefixes_1", [](auto& v) { v.pop_back(); }, "valid_prefixes_1"},
  };
  for (const Case& c : cases) {
    const fs::path d = copy_artifact(std::string("invariant-") + c.table);
    const json m = read_manifest(d);
    const std::string rel = m["tables"][c.table]["file"];
    auto values = npy_values(d / rel);
    c.mutate(values);
    std::string shape = "(";
    for (const auto& x : m["tables"][c.table]["shape"]) shape += std::to_string(x.get<std::int64_t>()) + ", ";
    shape = shape.substr(0, shape.size() - 2) + (m["tables"][c.table]["shape"].size() == 1 ? ",)" : ")");
    write_npy(d / rel, m["tables"][c.table]["dtype"] == "int64" ? "<i8" : "<u8", shape, values);
    edit(d, [](json&) {}, {rel});
    EXPECT_ERROR(load(d), c.message);
  }
}

void test_refuses_limits_that_disagree_with_the_graphs() {
  const fs::path d = copy_artifact("limits-beam");
  edit(d, [](json& m) { m["limits"]["max_beam"] = m["limits"]["max_beam"].get<int>() * 2; });
  EXPECT_ERROR(load(d), "does not match the limits");
  const fs::path h = copy_artifact("limits-hidden");
  edit(h, [](json& m) { m["limits"]["hidden_size"] = m["limits"]["hidden_size"].get<int>() + 1; });
  EXPECT_ERROR(load(h), "graphs.fp32.backbone.outputs: [hidden float32 [batch, ");
  const fs::path c = copy_artifact("layout-codes");
  edit(c, [](json& m) {
    m["layout"]["codes"][0] = m["layout"]["codes"][0].get<int>() + 1;
    for (std::size_t i = 1; i < m["layout"]["offsets"].size(); ++i) m["layout"]["offsets"][i] = m["layout"]["offsets"][i].get<int>() + 1;
    m["layout"]["placeholder_start"] = m["layout"]["placeholder_start"].get<int>() + 1;
  });
  EXPECT_ERROR(load(c), "graphs.fp32.head_0.outputs");
  const fs::path io = copy_artifact("graph-io-lie");             // the manifest names another head's file
  edit(io, [](json& m) { m["graphs"]["fp32"]["head_1"]["file"] = m["graphs"]["fp32"]["head_2"]["file"]; });
  EXPECT_ERROR(load(io), "manifest.json: graphs: differs from what the build recorded in contract.json");
  rebind(io);                                                    // forged: the graph's own interface still refuses it
  EXPECT_ERROR(load(io), "outputs: 1, the manifest lists 2");
  edit(io, [](json& m) { m["graphs"]["fp32"]["head_0"]["file"] = m["graphs"]["fp32"]["head_1"]["file"]; });
  rebind(io);
  EXPECT_ERROR(load(io), "head_0");
  const fs::path t = copy_artifact("huge-tensor");
  edit(t, [](json& m) {
    m["limits"]["max_batch"] = 1 << 20;
    m["limits"]["max_beam"] = 1 << 10;
    for (auto& [p, graphs] : m["graphs"].items())
      for (auto& [name, g] : graphs.items()) {
        if (name == "backbone") g["dynamic"]["batch"][1] = 1 << 20;
        else g["dynamic"]["beams"][1] = 1 << 30;
      }
  });
  EXPECT_ERROR(load(t), "at most 16 GiB per tensor");
}

// An edit of what decides the answers (here offsets moved by one: ONNX Runtime raised at the first request,
// or the load decoded other items) is refused at load by name, whether files are hashed or not.
void test_refuses_a_manifest_edited_after_the_build() {
  const fs::path d = copy_artifact("offsets");
  edit(d, [](json& m) {
    for (auto& o : m["layout"]["offsets"]) o = o.get<int>() - 1;
    m["layout"]["placeholder_start"] = m["layout"]["placeholder_start"].get<int>() - 1;
  });
  nezha::Options unverified;
  unverified.verify = false;
  for (const auto& o : {nezha::Options{}, unverified})
    EXPECT_ERROR(load(d, o), "manifest.json: layout: differs from what the build recorded in contract.json");
  const fs::path c = copy_artifact("contract-gone");
  fs::remove(c / nezha::kContract);
  edit(c, [](json& m) { m["files"].erase(nezha::kContract); });
  EXPECT_ERROR(load(c), "'contract.json' has no entry in files");
}

void test_refuses_unknown_missing_and_mistyped_keys() {
  const fs::path d = copy_artifact("unknown-key");
  edit(d, [](json& m) { m["graphs"]["fp32"]["head_1"]["extra"] = 1; });
  EXPECT_ERROR(load(d), "graphs.fp32.head_1.extra: unknown key");
  const fs::path t = copy_artifact("unknown-top");
  edit(t, [](json& m) { m["calibration"] = json::object(); });
  EXPECT_ERROR(load(t), "calibration: unknown key");
  const fs::path s = copy_artifact("missing-key");
  edit(s, [](json& m) { m["graphs"]["fp32"]["head_1"].erase("dynamic"); });
  EXPECT_ERROR(load(s), "graphs.fp32.head_1.dynamic: missing key");
  const fs::path i = copy_artifact("float-int");
  edit(i, [](json& m) { m["limits"]["max_batch"] = 4.0; });
  EXPECT_ERROR(load(i), "limits.max_batch: expected an integer");
  const fs::path b = copy_artifact("bool-int");
  edit(b, [](json& m) { m["layout"]["pad_token_id"] = true; });
  EXPECT_ERROR(load(b), "layout.pad_token_id: expected an integer, got a boolean");
  const fs::path v = copy_artifact("version");
  edit(v, [](json& m) { m["version"] = 1; });
  EXPECT_ERROR(load(v), "reads artifact format version 4");
  const fs::path u = copy_artifact("unlisted");
  edit(u, [](json& m) { m["files"].erase(m["tables"]["sid_keys"]["file"].get<std::string>()); });
  EXPECT_ERROR(load(u), "has no entry in files");
  const fs::path g = copy_artifact("engines-cpu-only");
  edit(g, [](json& m) {
    json entry = {{"file", m["validation"]}, {"compute_capability", "9.0"}, {"tensorrt", "10.8"}, {"strongly_typed", true},
                  {"profiles", json::array()}, {"device", {{"name", "NVIDIA H100"}, {"uuid", "GPU-0"}}},
                  {"hardware_compatibility", "none"}};
    for (const auto& [name, graph] : m["graphs"]["fp32"].items()) m["engines"]["int8-cpu"][name] = entry;
  });
  EXPECT_ERROR(load(g), "engines.int8-cpu: engines exist only");
  edit(g, [](json& m) {                            // TensorRT engines of a GPU precision: hashed, not used here
    m["engines"]["fp32"] = m["engines"]["int8-cpu"];
    m["engines"].erase("int8-cpu");
  });
  rebind(g);
  CHECK(load(g) != nullptr);
  const fs::path dup = copy_artifact("duplicate-key");
  {
    std::string text = nezha::read_file((dup / "manifest.json").string());
    text.insert(text.find('{') + 1, "\"version\": 2, ");
    std::ofstream(dup / "manifest.json") << text;
  }
  EXPECT_ERROR(load(dup), "key 'version' appears twice");
  const fs::path deep = copy_artifact("deep");
  edit(deep, [](json& m) {
    json nested = 1;
    for (int i = 0; i < 100; ++i) nested = json::array({nested});
    m["precisions"]["fp32"]["quantization"] = {{"x", nested}};
  });
  EXPECT_ERROR(load(deep), "nested deeper than 32 levels");
  const fs::path nul = copy_artifact("nul-then-text");            // nlohmann alone would stop at the NUL
  std::ofstream(nul / "manifest.json", std::ios::app) << std::string(1, '\0') << "anything";
  EXPECT_ERROR(load(nul), "contains a NUL byte");
  const fs::path j = copy_artifact("not-json");
  std::ofstream(j / "manifest.json") << "{\"format\": ";
  EXPECT_ERROR(load(j), "is not valid JSON");
  EXPECT_ERROR(load(g_tmp / "no-such-folder"), "does not exist");
  nezha::Options o;
  o.precision = "fp16x";
  EXPECT_ERROR(load(g_artifact, o), "precision 'fp16x'; allowed: fp32, fp16, int8, int8-cpu");
  o.precision = "fp16";
  EXPECT_ERROR(load(g_artifact, o), "has no 'fp16' graphs");
  const fs::path extra = copy_artifact("unlisted-file");
  std::ofstream(extra / "graphs" / "fp32" / "backbone.onnx.data") << "weights nobody hashed";
  EXPECT_ERROR(load(extra), "graphs/fp32/backbone.onnx.data: a file the manifest does not list");
}

// Random damage to manifest.json and to a table (unverified, so the parsers see it): every load either
// succeeds or throws nezha::Error; no other exception, no crash (the sanitizer build runs this too).
void test_damaged_inputs_never_crash() {
  const fs::path d = copy_artifact("fuzz");
  const std::string manifest = nezha::read_file((d / "manifest.json").string());
  const std::string table_rel = read_manifest(d)["tables"]["item_codes"]["file"];
  const std::string table = nezha::read_file((d / table_rel).string());
  unsigned x = 12345;
  auto next = [&] { return x = x * 1664525u + 1013904223u; };
  nezha::Options o;
  o.verify = false;
  o.intra_op_threads = 1;
  int refused = 0, loaded = 0;
  for (int i = 0; i < 300; ++i) {
    const bool damage_table = i % 3 == 2;
    std::string bytes = damage_table ? table : manifest;
    const unsigned kind = next() % 3;
    if (kind == 0) bytes.resize(next() % bytes.size());                        // truncated
    else if (damage_table) bytes[next() % 128 % bytes.size()] = char(next());  // header bytes
    else
      for (int j = 0; j < 1 + int(next() % 3); ++j) bytes[next() % bytes.size()] = "{}[]\",:0123456789-.etfn \\"[next() % 26];
    std::ofstream(d / (damage_table ? table_rel : "manifest.json"), std::ios::binary | std::ios::trunc) << bytes;
    try {
      nezha::Recommender::load(d.string(), o);
      ++loaded;
    } catch (const nezha::Error&) {
      ++refused;
    }
    std::ofstream(d / (damage_table ? table_rel : "manifest.json"), std::ios::binary | std::ios::trunc) << (damage_table ? table : manifest);
  }
  std::cout << "  300 damaged inputs: " << refused << " refused with nezha::Error, " << loaded << " still valid\n";
  CHECK(refused > 200);
}

void test_request_policies() {
  auto rec = load(g_artifact);
  const auto items = catalog_items(g_artifact);
  const int max_beam = rec->max_beam();
  EXPECT_ERROR(rec->recommend({{items[0]}}, 5, 4), "k must be an integer in 1..beam (4), got 5");
  EXPECT_ERROR(rec->recommend({{items[0]}}, 0, 4), "k must be an integer in 1..beam");
  EXPECT_ERROR(rec->recommend({{items[0]}}, 1, max_beam + 1), "beam must be an integer in 1.." + std::to_string(max_beam));
  EXPECT_ERROR(rec->recommend({}, 1, 1), "no histories given");
  EXPECT_ERROR(rec->recommend({{items[0]}, {}}, 1, 2), "history 1 is empty");
  const std::int64_t unknown = items.back() + 1000;
  EXPECT_ERROR(rec->recommend({{items[0], unknown}}, 1, 2), "history 0 has item ids not in the catalog: [" + std::to_string(unknown) + "]");
  EXPECT_ERROR(rec->recommend({{unknown}}, 1, 2, nezha::Unknown::skip), "history 0 is empty (after dropping unknown items)");
  // skip drops the unknown items: the same answer as without them
  CHECK(same(rec->recommend({{unknown, items[2], items[3], unknown}}, 3, 6, nezha::Unknown::skip),
             rec->recommend({{items[2], items[3]}}, 3, 6)));
  // truncation: only the most recent max_history items count
  std::vector<std::int64_t> long_history;
  for (int i = 0; i < rec->max_history() + 5; ++i) long_history.push_back(items[std::size_t(i) % items.size()]);
  const std::vector<std::int64_t> tail(long_history.end() - rec->max_history(), long_history.end());
  CHECK(same(rec->recommend({long_history}, 3, 6), rec->recommend({tail}, 3, 6)));
  // batches above max_batch are split: the same answers as one by one
  const auto hs = histories(items, rec->max_batch() * 2 + 1, 9);
  const auto together = rec->recommend(hs, 4, 8);
  for (std::size_t b = 0; b < hs.size(); ++b) CHECK(same({together[b]}, rec->recommend({hs[b]}, 4, 8), 1e-5f));
  // k = beam = max_beam works; results never exceed k
  const auto wide = rec->recommend({hs[0]}, max_beam, max_beam);
  CHECK(wide[0].size() <= std::size_t(max_beam));
}

void test_threads_equal_serial() {
  auto rec = load(g_artifact);
  const auto items = catalog_items(g_artifact);
  const auto hs = histories(items, 24, 9, 11);
  std::vector<std::vector<std::vector<nezha::ScoredItem>>> serial;
  for (int beam : {1, 4, 16}) serial.push_back(rec->recommend(hs, 1 + beam / 4, beam));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        const int i = (t + round) % 3, beam = std::vector<int>{1, 4, 16}[std::size_t(i)];
        if (!same(rec->recommend(hs, 1 + beam / 4, beam), serial[std::size_t(i)])) ++mismatches;
      }
    });
  for (auto& th : threads) th.join();
  CHECK(mismatches == 0);
}

void test_c_abi_reports_errors() {
  CHECK(nezha_load((g_tmp / "no-such").c_str(), nullptr, 1, 1, 1 << 20, nullptr) == nullptr);
  CHECK(std::string(nezha_last_error()).find("does not exist") != std::string::npos);
  nezha_recommender* r = nezha_load(g_artifact.c_str(), nullptr, 1, 1, 64 << 20, nullptr);
  CHECK(r != nullptr);
  const auto items = catalog_items(g_artifact);
  std::int64_t offsets[2] = {0, 1}, out_items[4];
  float out_scores[4];
  std::int32_t lengths[1];
  CHECK(nezha_recommend(r, items.data(), offsets, 1, 9, 4, 0, out_items, out_scores, lengths) == NEZHA_ERROR_REQUEST);
  CHECK(std::string(nezha_last_error()).find("k must be") != std::string::npos);
  CHECK(nezha_last_error_kind() == NEZHA_ERROR_REQUEST);
  const std::int64_t unknown[1] = {items.back() + 1000};
  CHECK(nezha_recommend(r, unknown, offsets, 1, 4, 4, 0, out_items, out_scores, lengths) == NEZHA_ERROR_HISTORY);
  CHECK(std::string(nezha_last_error()).find("not in the catalog") != std::string::npos);
  CHECK(nezha_load(g_artifact.c_str(), "fp64", 1, 1, 1 << 20, nullptr) == nullptr);
  CHECK(nezha_last_error_kind() == NEZHA_ERROR_OPTION);
  CHECK(nezha_load((g_tmp / "no-such").c_str(), nullptr, 1, 1, 1 << 20, nullptr) == nullptr);
  CHECK(nezha_last_error_kind() == NEZHA_ERROR_ARTIFACT);
  CHECK(nezha_recommend(r, items.data(), offsets, 1, 4, 4, 0, out_items, out_scores, lengths) == 0);
  CHECK(lengths[0] >= 1 && lengths[0] <= 4);
  nezha_free(r);
}

// nezha_item_codes + nezha_decode_batch (the Python binding's prepare and decode_batch): a batch of mixed
// lengths with a k per history gives each history its nezha_recommend answer alone, bit for bit.
void test_c_abi_decode_batch_is_recommend() {
  nezha_recommender* r = nezha_load(g_artifact.c_str(), nullptr, 1, 1, 64 << 20, nullptr);
  CHECK(r != nullptr);
  const auto items = catalog_items(g_artifact);
  CHECK(nezha_item_count(r) == std::int64_t(items.size()));
  int levels = 0, max_batch = 0;
  nezha_info(r, &levels, nullptr, &max_batch, nullptr);
  CHECK(nezha_codebook_size(r, 0) > 0 && nezha_codebook_size(r, levels) == 0);
  const auto hs = histories(items, max_batch * 2 + 1, 9, 21);
  std::vector<std::int64_t> flat, offsets{0};
  for (const auto& h : hs) {
    flat.insert(flat.end(), h.begin(), h.end());
    offsets.push_back(std::int64_t(flat.size()));
  }
  std::vector<std::int64_t> codes(flat.size() * std::size_t(levels)), code_offsets(hs.size() + 1);
  CHECK(nezha_item_codes(r, flat.data(), offsets.data(), hs.size(), 0, codes.data(), code_offsets.data()) == NEZHA_OK);
  CHECK(code_offsets.back() == std::int64_t(flat.size()));
  const int beam = 8;
  std::vector<std::int32_t> ks, lengths(hs.size());
  for (std::size_t b = 0; b < hs.size(); ++b) ks.push_back(std::int32_t(1 + b % beam));
  std::vector<std::int64_t> out_items(std::size_t(beam) * hs.size());
  std::vector<float> out_scores(out_items.size());
  CHECK(nezha_decode_batch(r, codes.data(), code_offsets.data(), hs.size(), beam, ks.data(), out_items.data(), out_scores.data(),
                           lengths.data()) == NEZHA_OK);
  std::size_t at = 0;
  for (std::size_t b = 0; b < hs.size(); ++b) {
    std::int64_t solo_items[beam];
    float solo_scores[beam];
    std::int32_t solo_length = 0;
    const std::int64_t solo_offsets[2] = {0, std::int64_t(hs[b].size())};
    CHECK(nezha_recommend(r, hs[b].data(), solo_offsets, 1, ks[b], beam, 0, solo_items, solo_scores, &solo_length) == NEZHA_OK);
    CHECK(lengths[b] == solo_length);
    for (std::int32_t j = 0; j < solo_length; ++j)
      CHECK(out_items[at + std::size_t(j)] == solo_items[j] && out_scores[at + std::size_t(j)] == solo_scores[j]);
    at += std::size_t(ks[b]);
  }
  ks[1] = beam + 1;
  CHECK(nezha_decode_batch(r, codes.data(), code_offsets.data(), hs.size(), beam, ks.data(), out_items.data(), out_scores.data(),
                           lengths.data()) == NEZHA_ERROR_REQUEST);
  CHECK(std::string(nezha_last_error()) == "k must be an integer in 1..beam (8), got 9 (history 1)");
  const std::int64_t unknown[2] = {items[0], items.back() + 1000}, two[2] = {0, 2};
  CHECK(nezha_item_codes(r, unknown, two, 1, 0, codes.data(), code_offsets.data()) == NEZHA_ERROR_HISTORY);
  CHECK(nezha_item_codes(r, unknown, two, 1, 1, codes.data(), code_offsets.data()) == NEZHA_OK && code_offsets[1] == 1);
  CHECK(nezha_item_codes(r, unknown + 1, two, 1, 1, codes.data(), code_offsets.data()) == NEZHA_ERROR_HISTORY);
  CHECK(std::string(nezha_last_error()).find("history 0 is empty") == 0);
  codes[0] = nezha_codebook_size(r, 0);
  ks.assign(hs.size(), 1);
  CHECK(nezha_decode_batch(r, codes.data(), code_offsets.data(), 1, beam, ks.data(), out_items.data(), out_scores.data(),
                           lengths.data()) == NEZHA_ERROR_HISTORY);
  nezha_free(r);
}

void test_steady_state_allocates_nothing() {
#ifdef NEZHA_SANITIZE
  std::cout << "  (skipped under the sanitizers: they own malloc)\n";
#else
  auto rec = load(g_artifact);
  const auto items = catalog_items(g_artifact);
  // Requests of one shape (same batch, same longest history, same beam) but different users.
  std::vector<std::vector<std::int64_t>> requests;
  for (int r = 0; r < 20; ++r) requests.push_back({items[std::size_t(r) % items.size()], items[std::size_t(3 * r + 1) % items.size()], items[std::size_t(7 * r + 2) % items.size()]});
  std::vector<std::int64_t> flat, out_items(8 * 2);
  std::vector<float> out_scores(8 * 2);
  std::vector<std::int32_t> lengths(2);
  for (const auto& h : requests) flat.insert(flat.end(), h.begin(), h.end());
  auto request = [&](int r) {
    const std::int64_t offsets[3] = {0, 3, 6};
    rec->recommend_into({flat.data() + 3 * (r % 19), offsets, 2}, 8, 8, nezha::Unknown::error,
                        {out_items.data(), out_scores.data(), lengths.data()});
  };
  request(0);                                          // first call: this thread's buffers and bindings
  const std::int64_t rebinds = rec->rebinds();
  t_ours = t_ort = 0;
  t_counting = true;
  for (int r = 1; r <= 50; ++r) request(r);
  t_counting = false;
  std::cout << "  50 requests: " << t_ours << " allocations by the runtime, " << t_ort
            << " inside ONNX Runtime's Run (not counted), rebinds " << rec->rebinds() - rebinds << "\n";
  CHECK(t_ours == 0);
  // Same batch, history length and beam: only the heads' `parents` dim moves with the users (levels 1 ..
  // L-1 may rebind parent_state, nothing else).
  CHECK(rec->rebinds() - rebinds <= 50 * std::int64_t(rec->levels() - 1));
  // decode_codes_into (the server's call, from codes) allocates nothing either.
  std::vector<std::int64_t> codes(6 * std::size_t(rec->levels()));
  std::vector<std::uint64_t> sid_keys(2 * 8);
  std::vector<float> sid_scores(2 * 8);
  auto decode = [&](int r) {
    for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = std::int64_t((std::size_t(r) + i / 3) % 2);
    const std::int64_t offsets[3] = {0, 3, 6};
    CHECK(rec->decode_codes_into({codes.data(), offsets, 2}, 8, {sid_keys.data(), sid_scores.data()}) == 8);
  };
  decode(0);
  t_ours = 0;
  t_counting = true;
  for (int r = 1; r <= 20; ++r) decode(r);
  t_counting = false;
  CHECK(t_ours == 0);
  // The hook sees the runtime's allocations: a vector-returning call allocates its results.
  t_ours = 0;
  t_counting = true;
  rec->recommend({requests[0]}, 8, 8);
  t_counting = false;
  CHECK(t_ours > 0);
  // A new shape rebinds (and may allocate for the binding), then is steady again.
  const std::int64_t offsets1[2] = {0, 1};
  rec->recommend_into({flat.data(), offsets1, 1}, 8, 8, nezha::Unknown::error, {out_items.data(), out_scores.data(), lengths.data()});
  CHECK(rec->rebinds() > rebinds);
  t_ours = 0;
  t_counting = true;
  rec->recommend_into({flat.data() + 1, offsets1, 1}, 8, 8, nezha::Unknown::error, {out_items.data(), out_scores.data(), lengths.data()});
  t_counting = false;
  CHECK(t_ours == 0);
#endif
}

}  // namespace

int main(int argc, char** argv) {
  const char* from_env = std::getenv("NEZHA_TEST_ARTIFACT");
  if (argc < 2 && !from_env) {
    std::cout << "skipped: no artifact (usage: nezha_cpp_tests ARTIFACT [TEST ...], or set NEZHA_TEST_ARTIFACT; "
                 "tests/cpp_helpers.py builds one)\n";
    return 77;                                         // ctest's SKIP_RETURN_CODE
  }
  g_artifact = fs::absolute(argc >= 2 ? argv[1] : from_env).string();
  char pattern[] = "/tmp/nezha-cpp-tests-XXXXXX";
  g_tmp = mkdtemp(pattern);
  const std::vector<std::pair<std::string, void (*)()>> tests = {
      {"loads_and_recommends", test_loads_and_recommends},
      {"sha256", test_sha256},
      {"refuses_a_bad_checksum", test_refuses_a_bad_checksum},
      {"refuses_a_missing_file", test_refuses_a_missing_file},
      {"refuses_paths_outside_the_folder", test_refuses_paths_outside_the_folder},
      {"refuses_a_symlink_outside_but_follows_one_inside", test_refuses_a_symlink_outside_but_follows_one_inside},
      {"refuses_links_out_and_fifos_anywhere_in_the_folder", test_refuses_links_out_and_fifos_anywhere_in_the_folder},
      {"refuses_wrong_table_dtype_and_shape", test_refuses_wrong_table_dtype_and_shape},
      {"npy_reader_is_strict", test_npy_reader_is_strict},
      {"refuses_broken_table_invariants", test_refuses_broken_table_invariants},
      {"refuses_limits_that_disagree_with_the_graphs", test_refuses_limits_that_disagree_with_the_graphs},
      {"refuses_a_manifest_edited_after_the_build", test_refuses_a_manifest_edited_after_the_build},
      {"refuses_unknown_missing_and_mistyped_keys", test_refuses_unknown_missing_and_mistyped_keys},
      {"damaged_inputs_never_crash", test_damaged_inputs_never_crash},
      {"request_policies", test_request_policies},
      {"threads_equal_serial", test_threads_equal_serial},
      {"c_abi_reports_errors", test_c_abi_reports_errors},
      {"c_abi_decode_batch_is_recommend", test_c_abi_decode_batch_is_recommend},
      {"steady_state_allocates_nothing", test_steady_state_allocates_nothing},
  };
  const std::vector<std::string> only(argc > 2 ? argv + 2 : argv + argc, argv + argc);
  int run = 0;
  for (const auto& [name, fn] : tests) {
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
    ++run;
    try {
      fn();
      std::cout << "ok   " << name << "\n";
    } catch (const Failure& f) {
      ++g_failures;
      std::cout << "FAIL " << name << ": " << f.message << "\n";
    } catch (const std::exception& e) {
      ++g_failures;
      std::cout << "FAIL " << name << ": unexpected exception: " << e.what() << "\n";
    }
  }
  fs::remove_all(g_tmp);
  std::cout << run - g_failures << " passed, " << g_failures << " failed\n";
  return g_failures ? 1 : run ? 0 : 2;
}
