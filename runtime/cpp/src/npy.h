// A strict .npy reader for the artifact's tables: format 1.0 or 2.0, little-endian 8-byte integers
// ('<i8', '<u8'), C order, the dtype and shape the manifest names, and nothing else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace nezha {

struct NpyArray {
  std::string dtype;                        // "int64" or "uint64"
  std::vector<std::int64_t> shape;
  std::vector<std::uint64_t> data;          // raw 8-byte elements; int64 tables reinterpret them
};

// Parses the bytes of a .npy file (`source` names it in messages). Throws nezha::Error.
NpyArray parse_npy(const std::string& bytes, const std::string& source);

}  // namespace nezha
