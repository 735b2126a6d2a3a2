// The model-free verifier (runtime/decode.py): which SID prefixes exist. Per level, a dense table of one
// byte row of codes per valid parent prefix where it fits the memory budget (a lookup is one binary
// search of the parent and a row read), else an open-addressing hash set of the level's prefix keys.
// The per-level choice is the Python verifier's, so both runtimes make the same one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "manifest.h"

namespace nezha {

class PrefixHashSet {
 public:
  explicit PrefixHashSet(const std::vector<std::uint64_t>& keys);
  bool contains(std::uint64_t key) const;
  std::size_t nbytes() const { return table_.size() * sizeof(std::uint64_t); }

 private:
  std::uint64_t home(std::uint64_t key) const;
  std::vector<std::uint64_t> table_;        // kEmpty or a key; linear probing, load factor <= 0.5
  std::uint64_t mask_ = 0;
  unsigned shift_ = 0;
};

class Verifier {
 public:
  Verifier(const Layout& layout, const std::vector<std::vector<std::uint64_t>>& valid_prefixes, std::size_t dense_budget_bytes);

  bool dense(int level) const { return dense_[std::size_t(level)]; }
  // Dense level: the validity bitmap of a parent prefix key's codes (bit c of word c / 64; all zero if
  // the parent is no valid prefix). Level 0's only parent is the root, key 0.
  const std::uint64_t* row(int level, std::uint64_t parent_key) const;
  // Hash level: is `key` (a prefix of level+1 codes) valid?
  bool contains(int level, std::uint64_t key) const { return sets_[std::size_t(level)].contains(key); }
  const std::vector<std::string>& kinds() const { return kinds_; }

 private:
  std::vector<std::int64_t> codes_;
  std::vector<bool> dense_;
  std::vector<std::string> kinds_;
  std::vector<std::vector<std::uint64_t>> parents_;        // sorted parent keys per level
  std::vector<std::size_t> words_;                         // 64-bit words per row
  std::vector<std::vector<std::uint64_t>> rows_;           // dense: [(parents + 1) * words] bitmaps
  std::vector<PrefixHashSet> sets_;                        // hash: the level's keys (empty set when dense)
};

}  // namespace nezha
