#include "manifest.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <set>
#include <sstream>

#include "files.h"
#include "nezha/recommender.h"

namespace nezha {
namespace {

using json = nlohmann::json;

constexpr std::int64_t kMaxTensorBytes = std::int64_t{16} << 30;     // one tensor at the largest shapes

const char* type_name(const json& v) {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "a list";
  return "an object";
}

// Reads one JSON document strictly; `source` (the manifest's path) prefixes every message.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw Error(source_ + ": " + (path.empty() ? "" : path + ": ") + what);
  }

  const json& object(const json& v, const std::string& path) const {
    if (!v.is_object()) fail(path, std::string("expected an object, got ") + type_name(v));
    return v;
  }

  // `v` must be an object with exactly `keys`.
  const json& exact(const json& v, const std::string& path, std::initializer_list<const char*> keys) const {
    object(v, path);
    std::set<std::string> allowed(keys.begin(), keys.end());
    for (const auto& item : v.items())
      if (!allowed.count(item.key())) fail(join(path, item.key()), "unknown key (allowed here: " + list(keys) + ")");
    for (const char* key : keys)
      if (!v.contains(key)) fail(join(path, key), "missing key");
    return v;
  }

  std::int64_t integer(const json& v, const std::string& path, std::int64_t lo = std::numeric_limits<std::int64_t>::min()) const {
    if (!v.is_number_integer()) fail(path, std::string("expected an integer, got ") + type_name(v));
    if (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      fail(path, "integer too large");
    std::int64_t x = v.get<std::int64_t>();
    if (x < lo) fail(path, "must be >= " + std::to_string(lo) + ", got " + std::to_string(x));
    return x;
  }

  std::string string(const json& v, const std::string& path) const {
    if (!v.is_string()) fail(path, std::string("expected a string, got ") + type_name(v));
    return v.get<std::string>();
  }

  std::string string_or_null(const json& v, const std::string& path) const {
    return v.is_null() ? std::string() : string(v, path);
  }

  const json& list_of(const json& v, const std::string& path) const {
    if (!v.is_array()) fail(path, std::string("expected a list, got ") + type_name(v));
    return v;
  }

  std::vector<std::int64_t> integers(const json& v, const std::string& path, std::int64_t lo) const {
    std::vector<std::int64_t> out;
    list_of(v, path);
    for (std::size_t i = 0; i < v.size(); ++i) out.push_back(integer(v[i], path + "[" + std::to_string(i) + "]", lo));
    return out;
  }

  std::string path_value(const json& v, const std::string& path) const {
    std::string p = string(v, path);
    check_relative_path(p, source_ + ": " + path);
    return p;
  }

  static std::string join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

  static std::string list(std::initializer_list<const char*> keys) {
    std::string out;
    for (const char* k : keys) out += (out.empty() ? "" : ", ") + std::string(k);
    return out;
  }

 private:
  std::string source_;
};

std::string shape_text(const std::vector<Dim>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i)
    out += (i ? ", " : "") + (shape[i].name.empty() ? std::to_string(shape[i].size) : shape[i].name);
  return out + "]";
}

std::string tensors_text(const std::vector<TensorSpec>& tensors) {
  std::string out = "[";
  for (std::size_t i = 0; i < tensors.size(); ++i)
    out += (i ? ", " : "") + tensors[i].name + " " + tensors[i].dtype + " " + shape_text(tensors[i].shape);
  return out + "]";
}

bool same_tensors(const std::vector<TensorSpec>& a, const std::vector<TensorSpec>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].dtype != b[i].dtype || a[i].shape.size() != b[i].shape.size()) return false;
    for (std::size_t d = 0; d < a[i].shape.size(); ++d)
      if (a[i].shape[d].name != b[i].shape[d].name || a[i].shape[d].size != b[i].shape[d].size) return false;
  }
  return true;
}

Dim named(const char* name) { return Dim{0, name}; }
Dim fixed(std::int64_t size) { return Dim{size, ""}; }

// The graph entry the layout and limits call for (docs/artifact.md, "The graphs and their invariants").
GraphEntry expected_graph(const std::string& name, const Layout& layout, const Limits& limits) {
  const std::int64_t L = layout.levels(), H = limits.hidden_size;
  GraphEntry g;
  if (name == "backbone") {
    g.inputs = {{"input_ids", "int64", {named("batch"), named("tokens")}},
                {"attention_mask", "int64", {named("batch"), named("tokens")}}};
    g.outputs = {{"hidden", "float32", {named("batch"), fixed(L + 1), fixed(H)}}};
    g.dynamic = {{"batch", {1, limits.max_batch}}, {"tokens", {2 * L, (limits.max_history + 1) * L}}};
    return g;
  }
  const int level = std::stoi(name.substr(5));
  const std::int64_t beams = limits.max_batch * limits.max_beam;
  if (level == 0) {
    g.inputs = {{"root", "float32", {named("beams"), fixed(H)}}};
    g.dynamic = {{"beams", {1, beams}}};
  } else {
    g.inputs = {{"parent_state", "float32", {named("parents"), fixed(H)}}, {"parent", "int64", {named("beams")}},
                {"code", "int64", {named("beams")}}};
    g.dynamic = {{"beams", {1, beams}}, {"parents", {1, beams}}};
  }
  g.inputs.push_back({"hidden", "float32", {named("beams"), fixed(H)}});
  g.outputs = {{"log_probs", "float32", {named("beams"), fixed(layout.codes[level])}}};
  if (level > 0 && level < L - 1) g.outputs.push_back({"state", "float32", {named("beams"), fixed(H)}});
  return g;
}

Layout read_layout(const Reader& r, const json& v) {
  r.exact(v, "layout", {"codes", "offsets", "placeholder_start", "pad_token_id"});
  Layout l;
  l.codes = r.integers(v["codes"], "layout.codes", 1);
  l.offsets = r.integers(v["offsets"], "layout.offsets", 0);
  l.placeholder_start = r.integer(v["placeholder_start"], "layout.placeholder_start", 0);
  l.pad_token_id = r.integer(v["pad_token_id"], "layout.pad_token_id", 0);
  if (l.codes.empty()) r.fail("layout.codes", "needs at least one level");
  if (l.offsets.size() != l.codes.size())
    r.fail("layout.offsets", "has " + std::to_string(l.offsets.size()) + " entries, codes has " + std::to_string(l.codes.size()));
  double space = 1;
  for (std::int64_t c : l.codes) space *= double(c);
  if (space >= 9223372036854775808.0) r.fail("layout.codes", "the SID space does not fit 63-bit keys");
  for (int i = 1; i < l.levels(); ++i)
    if (l.offsets[i] != l.offsets[i - 1] + l.codes[i - 1])
      r.fail("layout.offsets", "offsets[" + std::to_string(i) + "] = " + std::to_string(l.offsets[i]) +
                                   ", expected offsets[i-1] + codes[i-1] = " + std::to_string(l.offsets[i - 1] + l.codes[i - 1]));
  const std::int64_t end = l.offsets.back() + l.codes.back();
  if (l.placeholder_start < end)
    r.fail("layout.placeholder_start", std::to_string(l.placeholder_start) + " overlaps the code tokens, which end at " + std::to_string(end));
  return l;
}

Limits read_limits(const Reader& r, const json& v) {
  r.exact(v, "limits", {"max_history", "max_batch", "max_beam", "hidden_size"});
  Limits l;
  l.max_history = r.integer(v["max_history"], "limits.max_history", 1);
  l.max_batch = r.integer(v["max_batch"], "limits.max_batch", 1);
  l.max_beam = r.integer(v["max_beam"], "limits.max_beam", 1);
  l.hidden_size = r.integer(v["hidden_size"], "limits.hidden_size", 1);
  if (__int128{l.max_batch} * l.max_beam >= (std::int64_t{1} << 31))
    r.fail("limits", "max_batch * max_beam and max_beam * codes (per level) must be < 2^31");
  if (l.max_history >= (std::int64_t{1} << 24)) r.fail("limits.max_history", std::to_string(l.max_history) + "; must be < 2^24");
  return l;
}

TensorSpec read_tensor(const Reader& r, const json& v, const std::string& path) {
  r.exact(v, path, {"name", "dtype", "shape"});
  TensorSpec t;
  t.name = r.string(v["name"], path + ".name");
  t.dtype = r.string(v["dtype"], path + ".dtype");
  r.list_of(v["shape"], path + ".shape");
  for (std::size_t i = 0; i < v["shape"].size(); ++i) {
    const json& d = v["shape"][i];
    const std::string dp = path + ".shape[" + std::to_string(i) + "]";
    if (d.is_string()) t.shape.push_back(Dim{0, d.get<std::string>()});
    else t.shape.push_back(Dim{r.integer(d, dp, 0), ""});
  }
  return t;
}

GraphEntry read_graph(const Reader& r, const json& v, const std::string& path) {
  r.exact(v, path, {"file", "external_data", "inputs", "outputs", "dynamic"});
  GraphEntry g;
  g.file = r.path_value(v["file"], path + ".file");
  if (!v["external_data"].is_null()) g.external_data = r.path_value(v["external_data"], path + ".external_data");
  for (const char* side : {"inputs", "outputs"}) {
    const std::string sp = path + "." + side;
    r.list_of(v[side], sp);
    auto& out = std::string(side) == "inputs" ? g.inputs : g.outputs;
    for (std::size_t i = 0; i < v[side].size(); ++i) out.push_back(read_tensor(r, v[side][i], sp + "[" + std::to_string(i) + "]"));
  }
  r.object(v["dynamic"], path + ".dynamic");
  for (const auto& item : v["dynamic"].items()) {
    const std::string dp = path + ".dynamic." + item.key();
    std::vector<std::int64_t> range = r.integers(item.value(), dp, 1);
    if (range.size() != 2 || range[0] > range[1]) r.fail(dp, "expected [lo, hi] with 1 <= lo <= hi");
    g.dynamic[item.key()] = {range[0], range[1]};
  }
  std::set<std::string> used;
  for (const auto* side : {&g.inputs, &g.outputs})
    for (const auto& t : *side)
      for (const auto& d : t.shape)
        if (!d.name.empty()) {
          used.insert(d.name);
          if (!g.dynamic.count(d.name)) r.fail(path + ".dynamic", "no range for dim '" + d.name + "' of tensor " + t.name);
        }
  for (const auto& [dim, range] : g.dynamic)
    if (!used.count(dim)) r.fail(path + ".dynamic." + dim, "no tensor has this dim");
  return g;
}

void check_graph(const Reader& r, const GraphEntry& g, const std::string& name, const std::string& path,
                 const Layout& layout, const Limits& limits) {
  const GraphEntry want = expected_graph(name, layout, limits);
  const std::string context = " (layout: " + std::to_string(layout.levels()) + " levels; limits: hidden_size " +
                              std::to_string(limits.hidden_size) + ", max_batch " + std::to_string(limits.max_batch) +
                              ", max_beam " + std::to_string(limits.max_beam) + ", max_history " +
                              std::to_string(limits.max_history) + ")";
  if (!same_tensors(g.inputs, want.inputs))
    r.fail(path + ".inputs", tensors_text(g.inputs) + ", expected " + tensors_text(want.inputs) + context);
  if (!same_tensors(g.outputs, want.outputs))
    r.fail(path + ".outputs", tensors_text(g.outputs) + ", expected " + tensors_text(want.outputs) + context);
  for (const auto& [dim, range] : want.dynamic) {
    const auto& have = g.dynamic.at(dim);
    if (have != range)
      r.fail(path + ".dynamic." + dim, "[" + std::to_string(have.first) + ", " + std::to_string(have.second) +
                                           "] does not match the limits: expected [" + std::to_string(range.first) + ", " +
                                           std::to_string(range.second) + "]" + context);
  }
  for (const auto* side : {&g.inputs, &g.outputs})
    for (const auto& t : *side) {
      double bytes = t.dtype == "float32" ? 4 : 8;          // as runtime/shapes.py's largest_tensor
      for (const auto& d : t.shape) bytes *= double(d.name.empty() ? d.size : g.dynamic.at(d.name).second);
      if (bytes > double(kMaxTensorBytes))
        r.fail(path, "tensor " + t.name + " needs " + std::to_string(std::int64_t(bytes / (1 << 20))) +
                         " MiB at the largest shapes; this reader allows at most 16 GiB per tensor");
    }
}

TableEntry read_table(const Reader& r, const json& v, const std::string& path) {
  r.exact(v, path, {"file", "dtype", "shape"});
  TableEntry t;
  t.file = r.path_value(v["file"], path + ".file");
  t.dtype = r.string(v["dtype"], path + ".dtype");
  t.shape = r.integers(v["shape"], path + ".shape", 0);
  return t;
}

}  // namespace

bool is_sha256(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

std::vector<std::string> graph_names(int levels) {
  std::vector<std::string> names{"backbone"};
  for (int i = 0; i < levels; ++i) names.push_back("head_" + std::to_string(i));
  return names;
}

void check_relative_path(const std::string& path, const std::string& where) {
  auto bad = [&](const std::string& why) { throw Error(where + ": path '" + path + "' " + why + "; paths must be relative POSIX paths inside the artifact folder"); };
  if (path.empty()) bad("is empty");
  if (path[0] == '/') bad("is absolute");
  if (path.find('\\') != std::string::npos) bad("contains a backslash");
  if (path.find('\0') != std::string::npos) bad("contains a NUL byte");
  std::size_t start = 0;
  while (true) {
    const std::size_t end = path.find('/', start);
    const std::string seg = path.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (seg.empty()) bad("has an empty segment");
    if (seg == "." || seg == "..") bad("has a '" + seg + "' segment");
    if (end == std::string::npos) break;
    start = end + 1;
  }
}

json parse_json(const std::string& text, const std::string& source) {
  // nlohmann ends a document at a NUL byte (for C strings); JSON has no NUL outside escapes, so refuse it.
  if (text.find('\0') != std::string::npos) throw Error(source + " is not valid JSON: it contains a NUL byte");
  json root;
  std::vector<std::set<std::string>> keys;      // the keys of each open object: a repeated key is an error
  std::string problem;
  const json::parser_callback_t check = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > 32 && problem.empty()) problem = "nested deeper than 32 levels";
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    else if (event == json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
    else if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second && problem.empty())
      problem = "key '" + parsed.get<std::string>() + "' appears twice";
    return problem.empty();
  };
  try {
    root = json::parse(text, check);
  } catch (const json::exception& e) {
    throw Error(source + " is not valid JSON: " + e.what());
  }
  if (!problem.empty()) throw Error(source + ": " + problem);
  return root;
}

static std::string canonical_sha256(const json& section) {
  return sha256_hex(section.dump(-1, ' ', /*ensure_ascii=*/true));    // keys sorted (std::map), no spaces
}

Manifest parse_manifest(const std::string& text, const std::string& source) {
  Reader r(source);
  const json root = parse_json(text, source);
  r.object(root, "");
  // Format and version first, so that another version gets this message rather than a key error.
  if (!root.contains("format") || !root["format"].is_string() || root["format"].get<std::string>() != kFormat)
    r.fail("format", std::string("expected \"") + kFormat + "\", got " + (root.contains("format") ? root["format"].dump() : "nothing"));
  if (!root.contains("version") || !root["version"].is_number_integer() || root["version"].get<std::int64_t>() != kVersion)
    r.fail("version", (root.contains("version") ? root["version"].dump() : std::string("missing")) +
                          "; this runtime reads artifact format version " + std::to_string(kVersion) +
                          ": rebuild the artifact with the matching nezha-deploy");
  r.exact(root, "", {"format", "version", "layout", "limits", "precisions", "graphs", "engines", "tables", "versions",
                     "source", "machine", "validation", "files"});
  Manifest m;
  m.layout = read_layout(r, root["layout"]);
  m.limits = read_limits(r, root["limits"]);
  if (__int128{*std::max_element(m.layout.codes.begin(), m.layout.codes.end())} * m.limits.max_beam >= (std::int64_t{1} << 31))
    r.fail("limits", "max_batch * max_beam and max_beam * codes (per level) must be < 2^31");
  const int L = m.layout.levels();
  const std::vector<std::string> names = graph_names(L);

  static const std::set<std::string> kPrecisions{"fp32", "fp16", "int8", "int8-cpu"};
  r.object(root["precisions"], "precisions");
  if (root["precisions"].empty()) r.fail("precisions", "no precision: the artifact has no graphs");
  for (const auto& item : root["precisions"].items()) {
    const std::string p = "precisions." + item.key();
    if (!kPrecisions.count(item.key())) r.fail(p, "unknown precision (allowed: fp32, fp16, int8, int8-cpu)");
    r.exact(item.value(), p, {"execution", "quantization"});
    PrecisionEntry e;
    e.execution = r.string(item.value()["execution"], p + ".execution");
    if (e.execution != "any" && e.execution != "cpu-only") r.fail(p + ".execution", "\"" + e.execution + "\"; allowed: \"any\", \"cpu-only\"");
    if (!item.value()["quantization"].is_null()) r.object(item.value()["quantization"], p + ".quantization");
    m.precisions[item.key()] = e;
    m.precision_order.push_back(item.key());
  }

  r.object(root["graphs"], "graphs");
  for (const auto& item : root["graphs"].items())
    if (!m.precisions.count(item.key())) r.fail("graphs." + item.key(), "precision not listed in precisions");
  for (const std::string& p : m.precision_order) {
    const std::string pp = "graphs." + p;
    if (!root["graphs"].contains(p)) r.fail(pp, "missing key (every precision needs its graphs)");
    const json& gs = r.object(root["graphs"][p], pp);
    for (const auto& item : gs.items())
      if (std::find(names.begin(), names.end(), item.key()) == names.end())
        r.fail(pp + "." + item.key(), "unknown graph (a " + std::to_string(L) + "-level artifact has backbone, head_0 .. head_" + std::to_string(L - 1) + ")");
    for (const std::string& name : names) {
      if (!gs.contains(name)) r.fail(pp + "." + name, "missing key");
      GraphEntry g = read_graph(r, gs[name], pp + "." + name);
      check_graph(r, g, name, pp + "." + name, m.layout, m.limits);
      if (!g.external_data.empty() && g.external_data != g.file + ".data")
        r.fail(pp + "." + name + ".external_data", "'" + g.external_data + "'; external data lies beside its graph, as '" + g.file + ".data'");
      m.graphs[p][name] = std::move(g);
    }
  }

  r.object(root["engines"], "engines");
  for (const auto& prec : root["engines"].items()) {
    const std::string pp = "engines." + prec.key();
    if (!m.precisions.count(prec.key()) || m.precisions[prec.key()].execution != "any")
      r.fail(pp, "engines exist only for listed precisions that may run on GPUs (execution \"any\")");
    r.object(prec.value(), pp);
    for (const std::string& name : names)
      if (!prec.value().contains(name)) r.fail(pp + "." + name, "missing key (engines come for every graph)");
    for (const auto& item : prec.value().items()) {
      const std::string ep = pp + "." + item.key();
      if (std::find(names.begin(), names.end(), item.key()) == names.end()) r.fail(ep, "unknown graph");
      const json& e = r.exact(item.value(), ep, {"file", "compute_capability", "tensorrt", "strongly_typed", "profiles",
                                                  "device", "hardware_compatibility"});
      m.engine_files.push_back(r.path_value(e["file"], ep + ".file"));
      r.string(e["compute_capability"], ep + ".compute_capability");
      r.string(e["tensorrt"], ep + ".tensorrt");
      if (!e["strongly_typed"].is_boolean()) r.fail(ep + ".strongly_typed", std::string("expected a boolean, got ") + type_name(e["strongly_typed"]));
      const json& device = r.exact(e["device"], ep + ".device", {"name", "uuid"});
      r.string(device["name"], ep + ".device.name");
      r.string(device["uuid"], ep + ".device.uuid");
      const std::string hw = r.string(e["hardware_compatibility"], ep + ".hardware_compatibility");
      if (hw != "none" && hw != "same_compute_capability" && hw != "ampere_plus")
        r.fail(ep + ".hardware_compatibility", "\"" + hw + "\"; allowed: \"none\", \"same_compute_capability\", \"ampere_plus\"");
      r.list_of(e["profiles"], ep + ".profiles");
      for (std::size_t i = 0; i < e["profiles"].size(); ++i) {
        const std::string pr = ep + ".profiles[" + std::to_string(i) + "]";
        for (const auto& input : r.object(e["profiles"][i], pr).items()) {
          const std::string ip = pr + "." + input.key();
          r.exact(input.value(), ip, {"min", "opt", "max"});
          for (const char* k : {"min", "opt", "max"}) r.integers(input.value()[k], ip + "." + k, 0);
        }
      }
    }
  }

  std::vector<std::string> table_names{"item_ids", "item_codes", "sid_keys", "sid_offsets", "sid_items"};
  for (int i = 0; i < L; ++i) table_names.push_back("valid_prefixes_" + std::to_string(i));
  const json& tables = r.object(root["tables"], "tables");
  for (const auto& item : tables.items())
    if (std::find(table_names.begin(), table_names.end(), item.key()) == table_names.end())
      r.fail("tables." + item.key(), "unknown table");
  for (const std::string& t : table_names) {
    if (!tables.contains(t)) r.fail("tables." + t, "missing key");
    m.tables[t] = read_table(r, tables[t], "tables." + t);
  }

  const json& versions = r.exact(root["versions"], "versions", {"torch", "transformers", "onnx", "onnxruntime", "tensorrt", "nezha-deploy"});
  for (const auto& item : versions.items()) r.string_or_null(item.value(), "versions." + item.key());
  const json& src = r.exact(root["source"], "source", {"checkpoint", "architecture", "index", "item_ids"});
  r.string(src["checkpoint"], "source.checkpoint");
  r.string(src["architecture"], "source.architecture");
  r.string_or_null(src["index"], "source.index");
  const std::string ids = r.string(src["item_ids"], "source.item_ids");
  if (ids != "index" && ids != "positions") r.fail("source.item_ids", "\"" + ids + "\"; allowed: \"index\", \"positions\"");
  const json& machine = r.exact(root["machine"], "machine", {"system", "arch", "cpu", "isa"});
  for (const char* k : {"system", "arch", "cpu"}) r.string(machine[k], std::string("machine.") + k);
  r.list_of(machine["isa"], "machine.isa");
  for (std::size_t i = 0; i < machine["isa"].size(); ++i) r.string(machine["isa"][i], "machine.isa[" + std::to_string(i) + "]");
  m.validation = r.path_value(root["validation"], "validation");

  for (const auto& item : r.object(root["files"], "files").items()) {
    check_relative_path(item.key(), source + ": files");
    const std::string digest = r.string(item.value(), "files." + item.key());
    if (!is_sha256(digest)) r.fail("files." + item.key(), "expected a sha256 (64 lower-case hex digits)");
    m.files[item.key()] = digest;
  }
  auto listed = [&](const std::string& path, const std::string& key) {
    if (!m.files.count(path)) r.fail(key, "'" + path + "' has no entry in files (every path the manifest uses needs its sha256)");
  };
  for (const auto& [p, graphs] : m.graphs)
    for (const auto& [name, g] : graphs) {
      listed(g.file, "graphs." + p + "." + name + ".file");
      if (!g.external_data.empty()) listed(g.external_data, "graphs." + p + "." + name + ".external_data");
    }
  for (const std::string& f : m.engine_files) listed(f, "engines");
  for (const auto& [name, t] : m.tables) listed(t.file, "tables." + name + ".file");
  listed(m.validation, "validation");
  listed(kContract, "files");

  // What decides the answers, as Manifest.contract computes it: each section's canonical JSON, of the
  // precisions only each execution (quantization is informational).
  json executions = json::object();
  for (const auto& [p, e] : m.precisions) executions[p] = e.execution;
  for (const char* section : {"layout", "limits", "graphs", "engines", "tables"}) m.contract[section] = canonical_sha256(root[section]);
  m.contract["precisions"] = canonical_sha256(executions);
  return m;
}

}  // namespace nezha
