// The verifier and catalog tables (tables/*.npy), read strictly and checked against their invariants.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.h"

namespace nezha {

struct Tables {
  std::vector<std::int64_t> item_ids;                      // [I] strictly ascending
  std::vector<std::int64_t> item_codes;                    // [I, L] row-major, code of item i at level l
  std::vector<std::uint64_t> sid_keys;                     // [S] strictly ascending SID keys
  std::vector<std::int64_t> sid_offsets;                   // [S+1] CSR offsets into sid_items
  std::vector<std::int64_t> sid_items;                     // [I] items of each SID, ascending
  std::vector<std::vector<std::uint64_t>> valid_prefixes;  // per level i: [P_i] keys of first i+1 codes

  // Index of `item` in item_ids, or -1.
  std::int64_t find_item(std::int64_t item) const;
};

// Reads every table of `manifest` from the folder `root` (see files.h) and checks dtypes, shapes and the
// invariants of docs/artifact.md. Throws nezha::Error naming the table and the broken invariant.
Tables load_tables(const std::string& root, const Manifest& manifest);

// An artifact folder checked as far as it goes without ONNX Runtime: the strict manifest, the folder's
// entries, every file (sha256 with `verify`), contract.json, the tables. What the Python runtime's
// Artifact.open(dir, verify).tables() checks; tests/test_cpp_artifacts.py runs both on one corpus.
struct CheckedArtifact {
  std::string root;
  Manifest manifest;
  Tables tables;
};
CheckedArtifact check_artifact(const std::string& artifact_dir, bool verify);

}  // namespace nezha
