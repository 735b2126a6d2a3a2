#include "tables.h"

#include <algorithm>
#include <cstring>

#include "files.h"
#include "npy.h"
#include "nezha/recommender.h"

namespace nezha {
namespace {

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

// One table: the manifest entry must name the dtype and rank the format requires, the file's header must
// equal the entry. `dims` are the expected sizes (-1: any, fixed by this table).
template <typename T>
std::vector<T> read_table(const std::string& root, const Manifest& m, const std::string& name, const char* dtype,
                          std::vector<std::int64_t> dims) {
  const TableEntry& e = m.tables.at(name);
  const std::string where = "table " + name + " (" + e.file + ")";
  if (e.dtype != dtype) throw Error(where + ": manifest dtype " + e.dtype + ", the format requires " + dtype);
  bool shape_ok = e.shape.size() == dims.size();
  for (std::size_t i = 0; shape_ok && i < dims.size(); ++i) shape_ok = dims[i] < 0 || dims[i] == e.shape[i];
  if (!shape_ok) {
    std::string want = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) want += (i ? ", " : "") + (dims[i] < 0 ? std::string("*") : std::to_string(dims[i]));
    throw Error(where + ": manifest shape " + shape_text(e.shape) + ", expected " + want + "]");
  }
  NpyArray a = parse_npy(read_file(resolve_inside(root, e.file)), where);
  if (a.dtype != e.dtype || a.shape != e.shape)
    throw Error(where + ": the file holds " + a.dtype + " " + shape_text(a.shape) + ", the manifest says " + e.dtype + " " + shape_text(e.shape));
  std::vector<T> out(a.data.size());
  if (!out.empty()) std::memcpy(out.data(), a.data.data(), out.size() * sizeof(T));
  return out;
}

template <typename T>
void strictly_ascending(const std::vector<T>& v, const std::string& name) {
  for (std::size_t i = 1; i < v.size(); ++i)
    if (!(v[i - 1] < v[i]))
      throw Error("table " + name + " is not strictly ascending at index " + std::to_string(i) + " (" +
                  std::to_string(v[i - 1]) + " then " + std::to_string(v[i]) + ")");
}

}  // namespace

std::int64_t Tables::find_item(std::int64_t item) const {
  auto it = std::lower_bound(item_ids.begin(), item_ids.end(), item);
  return it != item_ids.end() && *it == item ? it - item_ids.begin() : -1;
}

Tables load_tables(const std::string& root, const Manifest& m) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .npy reader assumes a little-endian host");
  const Layout& layout = m.layout;
  const int L = layout.levels();
  Tables t;
  t.item_ids = read_table<std::int64_t>(root, m, "item_ids", "int64", {-1});
  const std::int64_t I = std::int64_t(t.item_ids.size());
  if (I == 0) throw Error("table item_ids: the catalog has no items");
  t.item_codes = read_table<std::int64_t>(root, m, "item_codes", "int64", {I, L});
  t.sid_keys = read_table<std::uint64_t>(root, m, "sid_keys", "uint64", {-1});
  const std::int64_t S = std::int64_t(t.sid_keys.size());
  t.sid_offsets = read_table<std::int64_t>(root, m, "sid_offsets", "int64", {S + 1});
  t.sid_items = read_table<std::int64_t>(root, m, "sid_items", "int64", {I});
  for (int i = 0; i < L; ++i)
    t.valid_prefixes.push_back(read_table<std::uint64_t>(root, m, "valid_prefixes_" + std::to_string(i), "uint64", {-1}));

  strictly_ascending(t.item_ids, "item_ids");
  for (std::int64_t i = 0; i < I; ++i)
    for (int l = 0; l < L; ++l) {
      const std::int64_t c = t.item_codes[std::size_t(i * L + l)];
      if (c < 0 || c >= layout.codes[l])
        throw Error("table item_codes: item " + std::to_string(t.item_ids[std::size_t(i)]) + " has level-" + std::to_string(l) +
                    " code " + std::to_string(c) + ", outside 0.." + std::to_string(layout.codes[l] - 1));
    }
  std::uint64_t space = 1;                                  // fits: the manifest checked the product < 2^63
  for (std::int64_t c : layout.codes) space *= std::uint64_t(c);
  strictly_ascending(t.sid_keys, "sid_keys");
  if (S && t.sid_keys.back() >= space)
    throw Error("table sid_keys: key " + std::to_string(t.sid_keys.back()) + " is not below the SID space " + std::to_string(space));
  if (t.sid_offsets.front() != 0 || t.sid_offsets.back() != I)
    throw Error("table sid_offsets must start at 0 and end at " + std::to_string(I) + " (the item count), got " +
                std::to_string(t.sid_offsets.front()) + " .. " + std::to_string(t.sid_offsets.back()));
  strictly_ascending(t.sid_offsets, "sid_offsets");
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t j = t.sid_offsets[std::size_t(s)]; j < t.sid_offsets[std::size_t(s + 1)]; ++j) {
      const std::int64_t item = t.sid_items[std::size_t(j)];
      if (j > t.sid_offsets[std::size_t(s)] && !(t.sid_items[std::size_t(j - 1)] < item))
        throw Error("table sid_items: the items of SID " + std::to_string(t.sid_keys[std::size_t(s)]) + " are not strictly ascending");
      const std::int64_t row = t.find_item(item);
      if (row < 0) throw Error("table sid_items: item " + std::to_string(item) + " is not in item_ids");
      std::uint64_t key = 0;
      for (int l = 0; l < L; ++l) key = key * std::uint64_t(layout.codes[l]) + std::uint64_t(t.item_codes[std::size_t(row * L + l)]);
      if (key != t.sid_keys[std::size_t(s)])
        throw Error("table sid_items: item " + std::to_string(item) + " is listed under SID " + std::to_string(t.sid_keys[std::size_t(s)]) +
                    " but its codes make SID " + std::to_string(key));
    }
  std::vector<std::uint64_t> prefix(std::size_t(I), 0);     // every item's key of its first i+1 codes
  for (int i = 0; i < L; ++i) {
    for (std::int64_t r = 0; r < I; ++r)
      prefix[std::size_t(r)] = prefix[std::size_t(r)] * std::uint64_t(layout.codes[std::size_t(i)]) +
                               std::uint64_t(t.item_codes[std::size_t(r * L + i)]);
    std::vector<std::uint64_t> unique = prefix;
    std::sort(unique.begin(), unique.end());
    unique.erase(std::unique(unique.begin(), unique.end()), unique.end());
    if (t.valid_prefixes[std::size_t(i)] != unique)
      throw Error("table valid_prefixes_" + std::to_string(i) + ": not the sorted keys of every item's first " +
                  std::to_string(i + 1) + " codes");
  }
  if (t.valid_prefixes.back() != t.sid_keys)
    throw Error("table sid_keys: not the sorted keys of the items' SIDs (valid_prefixes_" + std::to_string(L - 1) + ")");
  return t;
}

CheckedArtifact check_artifact(const std::string& artifact_dir, bool verify) {
  CheckedArtifact a;
  a.root = artifact_root(artifact_dir);
  a.manifest = parse_manifest(read_manifest_text(a.root, artifact_dir), artifact_dir + "/manifest.json");
  check_tree(a.root, a.manifest);
  verify_files(a.root, a.manifest, verify);
  check_contract(a.root, a.manifest);
  a.tables = load_tables(a.root, a.manifest);
  return a;
}

}  // namespace nezha
