#include "verifier.h"

#include <algorithm>

namespace nezha {
namespace {
constexpr std::uint64_t kEmpty = ~std::uint64_t{0};        // never a key: keys are < 2^63
constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ull;   // Fibonacci hashing multiplier
}  // namespace

PrefixHashSet::PrefixHashSet(const std::vector<std::uint64_t>& keys) {
  unsigned bits = 4;
  while ((std::uint64_t{1} << bits) < std::max<std::uint64_t>(2 * keys.size(), 2)) ++bits;
  table_.assign(std::size_t{1} << bits, kEmpty);
  mask_ = (std::uint64_t{1} << bits) - 1;
  shift_ = 64 - bits;
  for (std::uint64_t k : keys) {
    std::uint64_t s = home(k);
    while (table_[s] != kEmpty && table_[s] != k) s = (s + 1) & mask_;
    table_[s] = k;
  }
}

std::uint64_t PrefixHashSet::home(std::uint64_t key) const { return (key * kGolden) >> shift_; }

bool PrefixHashSet::contains(std::uint64_t key) const {
  for (std::uint64_t s = home(key);; s = (s + 1) & mask_) {
    if (table_[s] == key) return true;
    if (table_[s] == kEmpty) return false;
  }
}

Verifier::Verifier(const Layout& layout, const std::vector<std::vector<std::uint64_t>>& valid_prefixes,
                   std::size_t dense_budget_bytes)
    : codes_(layout.codes) {
  std::size_t budget = dense_budget_bytes;
  for (int level = 0; level < layout.levels(); ++level) {
    const auto& keys = valid_prefixes[std::size_t(level)];
    const std::uint64_t C = std::uint64_t(layout.codes[std::size_t(level)]);
    parents_.push_back(level ? valid_prefixes[std::size_t(level - 1)] : std::vector<std::uint64_t>{0});
    const auto& parents = parents_.back();
    const std::size_t size = (parents.size() + 1) * C;       // the same budget rule as runtime/decode.py
    const std::size_t words = std::size_t((C + 63) / 64);
    words_.push_back(words);
    if (size <= budget) {
      std::vector<std::uint64_t> rows((parents.size() + 1) * words, 0);
      for (std::uint64_t k : keys) {
        const std::size_t rank = std::size_t(std::lower_bound(parents.begin(), parents.end(), k / C) - parents.begin());
        rows[rank * words + (k % C) / 64] |= std::uint64_t{1} << (k % C % 64);   // tables.cpp checked the parent exists
      }
      rows_.push_back(std::move(rows));
      sets_.emplace_back(std::vector<std::uint64_t>{});
      dense_.push_back(true);
      kinds_.push_back("dense");
      budget -= size;
    } else {
      rows_.emplace_back();
      sets_.emplace_back(keys);
      dense_.push_back(false);
      kinds_.push_back("hash");
    }
  }
}

const std::uint64_t* Verifier::row(int level, std::uint64_t parent_key) const {
  const auto& parents = parents_[std::size_t(level)];
  std::size_t rank = std::size_t(std::lower_bound(parents.begin(), parents.end(), parent_key) - parents.begin());
  if (rank == parents.size() || parents[rank] != parent_key) rank = parents.size();   // the all-zero row
  return rows_[std::size_t(level)].data() + rank * words_[std::size_t(level)];
}

}  // namespace nezha
