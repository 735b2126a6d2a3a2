// The NEZHA runtime in C++: loads an artifact folder (docs/artifact.md, format version 4) and answers
// "next items for these histories" with the same decode loop, verifier and policies as the Python
// runtime (runtime/recommender.py, runtime/decode.py). ONNX Runtime runs the graphs through its C++ API;
// the library opens ONNX Runtime's shared library at load time (dlopen), so it links no ONNX Runtime.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace nezha {

// Every user error (a bad artifact, request or option): the message names the problem and what is
// allowed. Anything else that escapes (std::bad_alloc, ...) is a bug or the machine.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The kinds of user error a caller can tell apart (the C ABI returns which; the Python binding raises the
// Python runtime's class for each). A plain Error is an artifact the loader refuses.
class RequestError : public Error {         // k, beam, the batch's shape: what a request may ask
 public:
  using Error::Error;
};
class HistoryError : public Error {         // a history that cannot be encoded: unknown items, empty, bad codes
 public:
  using Error::Error;
};
class OptionError : public Error {          // a load option outside what is allowed
 public:
  using Error::Error;
};
class RunError : public Error {             // a graph that failed while running a feed the runtime built
 public:
  using Error::Error;
};

// What to do with history item ids that are not in the artifact's catalog.
enum class Unknown { error, skip };

struct Options {
  std::string precision;                    // "" = the artifact's first precision (manifest order)
  int intra_op_threads = 0;                 // ONNX Runtime intra-op threads per session; 0 = its default
  bool verify = true;                       // check every file's sha256 against the manifest
  std::size_t dense_budget_bytes = 64u << 20;   // verifier: dense rows per level while they fit this
  // ONNX Runtime's shared library (libonnxruntime.so.1). "" = $NEZHA_ONNXRUNTIME_LIBRARY, else the library
  // found when the runtime was configured (ONNXRUNTIME_ROOT or the project's .venv wheel), else the
  // dynamic loader's search for libonnxruntime.so.1. One process uses one ONNX Runtime library.
  std::string onnxruntime_library;
};

struct ScoredItem {
  std::int64_t item;
  float score;                              // summed log-probabilities of the item's SID
};

// A batch of histories as one flat array: history b is items[offsets[b] .. offsets[b+1]) (oldest first).
struct HistoryBatch {
  const std::int64_t* items;
  const std::int64_t* offsets;              // [count + 1], offsets[0] = 0, non-decreasing
  std::size_t count;
};

// Caller-owned result arrays for the allocation-free call: [count, k] items and scores, best first;
// lengths[b] <= k results are valid for history b (fewer valid items than k gives fewer results).
struct ResultArrays {
  std::int64_t* items;
  float* scores;
  std::int32_t* lengths;
};

// Code histories (the catalog lookup done by the caller): history b is rows offsets[b] .. offsets[b+1]) of
// codes, a [offsets[count], L] row-major array of each item's L codes, oldest first.
struct CodeBatch {
  const std::int64_t* codes;
  const std::int64_t* offsets;              // [count + 1], offsets[0] = 0, non-decreasing, no empty history
  std::size_t count;
};

// Caller-owned [count, beam] arrays of the decoded SIDs: prefix keys (docs/artifact.md) and summed
// log-probabilities, best first; a slot with no valid SID has score -inf.
struct SidArrays {
  std::uint64_t* keys;
  float* scores;
};

class Recommender {
 public:
  // Opens and checks the artifact (strict manifest, paths, sha256, tables, graphs vs limits), then the
  // ONNX Runtime sessions. Throws nezha::Error with the reason.
  static std::unique_ptr<Recommender> load(const std::string& artifact_dir, const Options& options = {});
  ~Recommender();
  Recommender(const Recommender&) = delete;
  Recommender& operator=(const Recommender&) = delete;

  // Per history up to k (item id, score), best first. beam = 0: max(k, 20) capped at max_beam.
  // Thread-safe: each calling thread gets its own bound buffers, created on its first call.
  std::vector<std::vector<ScoredItem>> recommend(const std::vector<std::vector<std::int64_t>>& histories,
                                                 int k = 10, int beam = 0, Unknown unknown = Unknown::error);

  // The same without allocating after a thread's first call with the largest shapes: reads the flat
  // batch, writes into `out` ([count, k] each). beam = 0 as above.
  void recommend_into(const HistoryBatch& histories, int k, int beam, Unknown unknown, const ResultArrays& out);

  // Beam search from code histories, the step below items (runtime/recommender.py, decode_codes): writes
  // `out` ([count, beam]) and returns how many slots per history the search filled (<= beam; the rest
  // are key 0, score -inf). Allocation-free like recommend_into. Codes outside a level's codebook throw.
  std::int64_t decode_codes_into(const CodeBatch& histories, int beam, const SidArrays& out);

  // Item histories -> their items' codes, the catalog lookup of recommend_into and its checks (unknown
  // items under Unknown::error, a history empty after dropping them: HistoryError): writes codes
  // [kept, L] (every kept item's L codes, oldest first; the caller sizes it for offsets[count] items) and
  // code_offsets [count + 1] (history b is rows code_offsets[b] .. code_offsets[b+1]).
  void item_codes_into(const HistoryBatch& histories, Unknown unknown, std::int64_t* codes, std::int64_t* code_offsets) const;

  // Beam search from code histories, then SIDs -> items with a k per history (ks[b] in 1..beam): the
  // unit a server's batcher runs. Writes history b's up to ks[b] (item, score) pairs, best first, at
  // out.items/out.scores[ks[0] + .. + ks[b-1] ..] and their count at out.lengths[b]; each history's
  // answer is bit for bit its answer alone. Allocation-free like recommend_into.
  void decode_batch_into(const CodeBatch& histories, int beam, const std::int32_t* ks, const ResultArrays& out);

  // The latency floor: encode + one backbone run for the batch (no head, no verifier).
  void backbone_only(const HistoryBatch& histories, Unknown unknown = Unknown::error);

  // Seconds per stage of this thread's calls since the last reset ("encode", "backbone", "head_i",
  // "verify_i", "select", "items"), accumulated only while enabled (off by default).
  void set_stage_timing(bool enabled);
  std::vector<std::pair<std::string, double>> take_stage_seconds();

  // Evidence for the steady state (this thread's workspace): ONNX Runtime rebinds so far (shape changes).
  std::int64_t rebinds() const;

  const std::string& precision() const;
  int levels() const;
  int max_history() const;
  int max_batch() const;
  int max_beam() const;
  std::int64_t item_count() const;                            // items in the catalog
  int codebook_size(int level) const;                         // codes at `level`
  int default_beam(int k) const;
  const std::vector<std::string>& verifier_kinds() const;     // per level "dense" or "hash"

  struct Impl;

 private:
  explicit Recommender(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nezha
