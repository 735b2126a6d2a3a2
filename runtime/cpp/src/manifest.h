// The strict reader of manifest.json (docs/artifact.md, format version 4): every key checked, every
// unknown or missing key an error naming its path, typed values out. Paths are checked lexically here;
// their containment after symbolic links and the sha256 of each file are checked by files.h.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace nezha {

constexpr const char* kFormat = "nezha-artifact";
constexpr int kVersion = 4;                 // 4: contract.json binds the sections that decide the answers
constexpr const char* kContract = "contract.json";

struct Layout {
  std::vector<std::int64_t> codes;          // codes per level (L entries)
  std::vector<std::int64_t> offsets;        // token id of code 0 of each level
  std::int64_t placeholder_start = 0;       // token id of <sp_0>
  std::int64_t pad_token_id = 0;
  int levels() const { return static_cast<int>(codes.size()); }
};

struct Limits {
  std::int64_t max_history = 0, max_batch = 0, max_beam = 0, hidden_size = 0;
};

// A dim of a tensor shape: a fixed size or a named dynamic dim.
struct Dim {
  std::int64_t size = 0;                    // when name is empty
  std::string name;
};

struct TensorSpec {
  std::string name;
  std::string dtype;                        // "int64" or "float32"
  std::vector<Dim> shape;
};

struct GraphEntry {
  std::string file;
  std::string external_data;                // "" when null
  std::vector<TensorSpec> inputs, outputs;
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> dynamic;   // dim -> [lo, hi]
};

struct PrecisionEntry {
  std::string execution;                    // "any" or "cpu-only"
};

struct TableEntry {
  std::string file;
  std::string dtype;                        // "int64" or "uint64"
  std::vector<std::int64_t> shape;
};

struct Manifest {
  Layout layout;
  Limits limits;
  std::vector<std::string> precision_order;                 // manifest order
  std::map<std::string, PrecisionEntry> precisions;
  std::map<std::string, std::map<std::string, GraphEntry>> graphs;     // precision -> graph name -> entry
  std::vector<std::string> engine_files;                    // informational for this runtime; hashed
  std::map<std::string, TableEntry> tables;
  std::string validation;
  std::map<std::string, std::string> files;                 // path -> sha256 (lower-case hex)
  // Section (layout, limits, precisions, graphs, engines, tables) -> sha256 of its canonical JSON, to
  // compare with contract.json (docs/artifact.md, "The contract").
  std::map<std::string, std::string> contract;
};

// Strict JSON (both readers take the same documents): UTF-8, no NUL byte, no repeated key, at most 32
// containers deep. Throws nezha::Error naming `source`.
nlohmann::json parse_json(const std::string& text, const std::string& source);

// Parses and checks `text` (the contents of `source`, used in messages). Throws nezha::Error.
Manifest parse_manifest(const std::string& text, const std::string& source);

// The names of the graphs of an artifact with `levels` levels: backbone, head_0 .. head_{L-1}.
std::vector<std::string> graph_names(int levels);

// Throws nezha::Error unless `path` is a relative POSIX path without empty, "." or ".." segments and
// without backslashes (`where` names the manifest key in the message).
void check_relative_path(const std::string& path, const std::string& where);

}  // namespace nezha
