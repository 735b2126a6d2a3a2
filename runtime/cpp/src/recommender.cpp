// Recommender: load (manifest, files, tables, verifier, sessions) and the decode loop of
// runtime/decode.py over one thread's bound buffers: encode, backbone, then per level expand (head),
// verify, select; finally SIDs -> items.
#include "nezha/recommender.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "files.h"
#include "manifest.h"
#include "ort.h"
#include "tables.h"
#include "verifier.h"

namespace nezha {
namespace {

std::atomic<std::uint64_t> g_next_id{1};

using Clock = std::chrono::steady_clock;

struct Candidate {
  float score;                              // parent score + log-prob of the code
  std::int32_t index;                       // parent * codes + code, within the user's beams
};

// Best first: higher score, then lower flat index (the Python loop's tie order). A function object, so
// that the sort inlines it.
struct Better {
  bool operator()(const Candidate& a, const Candidate& b) const {
    return a.score > b.score || (a.score == b.score && a.index < b.index);
  }
};

template <typename T>
std::unique_ptr<T[]> buffer(std::size_t n) {
  return std::unique_ptr<T[]>(new T[n]);    // default-initialized: pages are touched only when used
}

}  // namespace

// One thread's buffers and bindings, allocated once for the manifest's largest shapes.
struct Workspace {
  std::unique_ptr<std::int64_t[]> input_ids, attention_mask;    // [max_batch, max_tokens]
  std::unique_ptr<float[]> hidden_run, hidden_all;             // [max_batch, L+1, H]: one backbone run's output, all rows
  std::unique_ptr<std::int32_t[]> run_rows;                    // [max_batch] the batch rows of one backbone run
  std::unique_ptr<float[]> parent_state, hidden, state;        // [max_beams, H] (shared by the heads)
  std::unique_ptr<std::int64_t[]> parent_row;                  // [max_beams] each beam's row of parent_state
  std::unique_ptr<std::int64_t[]> code;                        // [max_beams]
  std::unique_ptr<float[]> log_probs;                          // [max_beams, max codes]
  std::unique_ptr<float[]> scores, next_scores;                // [max_beams]
  std::unique_ptr<std::uint64_t[]> keys, next_keys;            // [max_beams] prefix keys
  std::unique_ptr<std::int32_t[]> parent;                      // [max_beams] flat parent beam of each beam
  std::unique_ptr<std::int32_t[]> slot;                        // [max_beams] parent beam -> parent_state row
  std::unique_ptr<Candidate[]> candidates;                     // [max_beam * max codes], one user at a time
  std::unique_ptr<const std::int64_t*[]> kept;                 // [max_batch, max_history] each item's L codes, newest first
  std::unique_ptr<std::int32_t[]> kept_count;                  // [max_batch] items kept per row
  std::vector<std::unique_ptr<GraphRunner>> runners;           // backbone, head_0 ..
  std::vector<double> stage_seconds;
  bool timing = false;
};

struct Recommender::Impl {
  std::uint64_t id = g_next_id++;
  std::string root, precision;
  Manifest manifest;
  Tables tables;
  std::unique_ptr<Verifier> verifier;
  std::unique_ptr<Sessions> sessions;
  int L = 0;
  std::int64_t H = 0, max_tokens = 0, max_beams = 0, max_codes = 0;
  std::vector<std::string> stage_names;

  std::mutex mutex;
  std::unordered_map<std::thread::id, Workspace*> by_thread;
  std::vector<std::unique_ptr<Workspace>> workspaces;          // destroyed before the sessions

  ~Impl() { workspaces.clear(); }

  Workspace& workspace();
  std::unique_ptr<Workspace> make_workspace();
  void check_request(std::size_t count, int k, int beam) const;
  void check_histories(const HistoryBatch& h, Unknown unknown) const;
  std::int32_t write_items(const Workspace& ws, std::size_t b, std::int64_t K, std::int32_t k, std::int64_t* items,
                           float* scores) const;
  void check_ks(const std::int32_t* ks, std::size_t count, int beam) const;
  void keep(Workspace& ws, const HistoryBatch& h, std::size_t first, std::size_t count) const;
  void check_codes(const CodeBatch& h) const;
  void keep_codes(Workspace& ws, const CodeBatch& h, std::size_t first, std::size_t count) const;
  void backbone(Workspace& ws, std::size_t B, Clock::time_point& t0) const;
  std::int64_t decode(Workspace& ws, std::size_t B, int beam) const;   // -> beams per user
  void expand(Workspace& ws, int level, std::size_t B, std::int64_t K, std::int64_t K_prev) const;
  std::int64_t verify(Workspace& ws, int level, std::size_t b, std::int64_t K) const;
  void select(Workspace& ws, int level, std::size_t b, std::int64_t K, std::int64_t K_next, std::int64_t m) const;
  // A batch in chunks of max_batch: per chunk keep(first, B) fills ws.kept, then the backbone and the decode
  // run and each(first, B, K) reads the chunk's K beams per row (ws.keys, ws.scores).
  template <typename Keep, typename Each>
  void decode_chunks(Workspace& ws, std::size_t count, int beam, Keep keep, Each each) const {
    Clock::time_point t0 = ws.timing ? Clock::now() : Clock::time_point{};
    for (std::size_t first = 0; first < count; first += std::size_t(manifest.limits.max_batch)) {
      const std::size_t B = std::min(count - first, std::size_t(manifest.limits.max_batch));
      keep(first, B);
      stage(ws, s_encode(), t0);
      backbone(ws, B, t0);
      const std::int64_t K = decode(ws, B, beam);
      if (ws.timing) t0 = Clock::now();
      each(first, B, K);
      stage(ws, s_items(), t0);
    }
  }
  void stage(Workspace& ws, std::size_t index, Clock::time_point& t0) const {
    if (!ws.timing) return;
    const Clock::time_point t1 = Clock::now();
    ws.stage_seconds[index] += std::chrono::duration<double>(t1 - t0).count();
    t0 = t1;
  }
  // stage indices
  std::size_t s_encode() const { return 0; }
  std::size_t s_backbone() const { return 1; }
  std::size_t s_head(int level) const { return 2 + std::size_t(level); }
  std::size_t s_verify(int level) const { return 2 + std::size_t(L + level); }
  std::size_t s_select() const { return 2 + 2 * std::size_t(L); }
  std::size_t s_items() const { return 3 + 2 * std::size_t(L); }
};

std::unique_ptr<Workspace> Recommender::Impl::make_workspace() {
  auto ws = std::make_unique<Workspace>();
  const std::int64_t B = manifest.limits.max_batch;
  ws->input_ids = buffer<std::int64_t>(std::size_t(B * max_tokens));
  ws->attention_mask = buffer<std::int64_t>(std::size_t(B * max_tokens));
  ws->hidden_run = buffer<float>(std::size_t(B * (L + 1) * H));
  ws->hidden_all = buffer<float>(std::size_t(B * (L + 1) * H));
  ws->run_rows = buffer<std::int32_t>(std::size_t(B));
  ws->parent_state = buffer<float>(std::size_t(max_beams * H));
  ws->hidden = buffer<float>(std::size_t(max_beams * H));
  ws->state = buffer<float>(std::size_t(max_beams * H));
  ws->parent_row = buffer<std::int64_t>(std::size_t(max_beams));
  ws->slot = buffer<std::int32_t>(std::size_t(max_beams));
  ws->code = buffer<std::int64_t>(std::size_t(max_beams));
  ws->log_probs = buffer<float>(std::size_t(max_beams * max_codes));
  ws->scores = buffer<float>(std::size_t(max_beams));
  ws->next_scores = buffer<float>(std::size_t(max_beams));
  ws->keys = buffer<std::uint64_t>(std::size_t(max_beams));
  ws->next_keys = buffer<std::uint64_t>(std::size_t(max_beams));
  ws->parent = buffer<std::int32_t>(std::size_t(max_beams));
  ws->candidates = buffer<Candidate>(std::size_t(manifest.limits.max_beam * max_codes));
  ws->kept = buffer<const std::int64_t*>(std::size_t(B * manifest.limits.max_history));
  ws->kept_count = buffer<std::int32_t>(std::size_t(B));
  ws->stage_seconds.assign(stage_names.size(), 0.0);
  const auto& graphs = manifest.graphs.at(precision);
  const std::vector<std::string> names = graph_names(L);
  for (std::size_t g = 0; g < names.size(); ++g) {
    std::vector<void*> bufs;
    if (g == 0) {
      bufs = {ws->input_ids.get(), ws->attention_mask.get(), ws->hidden_run.get()};
    } else {
      bufs = {ws->parent_state.get()};                           // level 0: the roots
      if (g > 1) bufs.insert(bufs.end(), {ws->parent_row.get(), ws->code.get()});
      bufs.insert(bufs.end(), {ws->hidden.get(), ws->log_probs.get()});
      if (g > 1 && g < names.size() - 1) bufs.push_back(ws->state.get());   // levels 1 .. L-2
    }
    ws->runners.push_back(std::make_unique<GraphRunner>(*sessions->by_graph[g], graphs.at(names[g]), bufs));
  }
  return ws;
}

Workspace& Recommender::Impl::workspace() {
  thread_local std::uint64_t cached_id = 0;
  thread_local Workspace* cached = nullptr;
  if (cached_id == id) return *cached;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = by_thread.find(std::this_thread::get_id());
  Workspace* ws;
  if (it != by_thread.end()) {
    ws = it->second;
  } else {
    workspaces.push_back(make_workspace());
    ws = workspaces.back().get();
    by_thread[std::this_thread::get_id()] = ws;
  }
  cached_id = id;
  cached = ws;
  return *ws;
}

std::unique_ptr<Recommender> Recommender::load(const std::string& artifact_dir, const Options& options) {
  if (options.intra_op_threads < 0 || options.intra_op_threads > 256)
    throw OptionError("intra_op_threads must be in 1..256, or 0 for ONNX Runtime's default; got " + std::to_string(options.intra_op_threads));
  if (!options.precision.empty() && options.precision != "fp32" && options.precision != "fp16" && options.precision != "int8" &&
      options.precision != "int8-cpu")
    throw OptionError("precision '" + options.precision + "'; allowed: fp32, fp16, int8, int8-cpu (or empty: the artifact's first)");
  auto impl = std::make_unique<Impl>();
  CheckedArtifact checked = check_artifact(artifact_dir, options.verify);
  impl->root = std::move(checked.root);
  impl->manifest = std::move(checked.manifest);
  impl->tables = std::move(checked.tables);
  const Manifest& m = impl->manifest;
  impl->precision = options.precision;
  if (impl->precision.empty())  // the first built of fp32, fp16, int8, int8-cpu: the same rule as Python, whatever the JSON order
    for (const char* p : {"fp32", "fp16", "int8", "int8-cpu"})
      if (m.graphs.count(p)) { impl->precision = p; break; }
  if (!m.graphs.count(impl->precision)) {
    std::string have;
    for (const auto& p : m.precision_order) have += (have.empty() ? "" : ", ") + p;
    throw Error("artifact " + impl->root + " has no '" + impl->precision + "' graphs; it has " + have);
  }
  impl->verifier = std::make_unique<Verifier>(m.layout, impl->tables.valid_prefixes, options.dense_budget_bytes);
  impl->L = m.layout.levels();
  impl->H = m.limits.hidden_size;
  impl->max_tokens = (m.limits.max_history + 1) * impl->L;
  impl->max_beams = m.limits.max_batch * m.limits.max_beam;
  impl->max_codes = *std::max_element(m.layout.codes.begin(), m.layout.codes.end());   // * max_beam < 2^31: checked
  impl->stage_names = {"encode", "backbone"};
  for (int i = 0; i < impl->L; ++i) impl->stage_names.push_back("head_" + std::to_string(i));
  for (int i = 0; i < impl->L; ++i) impl->stage_names.push_back("verify_" + std::to_string(i));
  impl->stage_names.insert(impl->stage_names.end(), {"select", "items"});
  load_onnxruntime(options.onnxruntime_library);
  impl->sessions = std::make_unique<Sessions>(impl->root, impl->precision, m, options.intra_op_threads);
  return std::unique_ptr<Recommender>(new Recommender(std::move(impl)));
}

Recommender::Recommender(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Recommender::~Recommender() = default;

const std::string& Recommender::precision() const { return impl_->precision; }
int Recommender::levels() const { return impl_->L; }
int Recommender::max_history() const { return int(impl_->manifest.limits.max_history); }
int Recommender::max_batch() const { return int(impl_->manifest.limits.max_batch); }
int Recommender::max_beam() const { return int(impl_->manifest.limits.max_beam); }
std::int64_t Recommender::item_count() const { return std::int64_t(impl_->tables.item_ids.size()); }
int Recommender::codebook_size(int level) const {
  return level >= 0 && level < impl_->L ? int(impl_->manifest.layout.codes[std::size_t(level)]) : 0;
}
int Recommender::default_beam(int k) const { return std::min(std::max(k, 20), max_beam()); }
const std::vector<std::string>& Recommender::verifier_kinds() const { return impl_->verifier->kinds(); }

std::int64_t Recommender::rebinds() const {
  std::int64_t n = 0;
  for (const auto& r : impl_->workspace().runners) n += r->rebinds();
  return n;
}

void Recommender::set_stage_timing(bool enabled) { impl_->workspace().timing = enabled; }

std::vector<std::pair<std::string, double>> Recommender::take_stage_seconds() {
  Workspace& ws = impl_->workspace();
  std::vector<std::pair<std::string, double>> out;
  for (std::size_t i = 0; i < impl_->stage_names.size(); ++i) out.emplace_back(impl_->stage_names[i], ws.stage_seconds[i]);
  std::fill(ws.stage_seconds.begin(), ws.stage_seconds.end(), 0.0);
  return out;
}

void Recommender::Impl::check_request(std::size_t count, int k, int beam) const {
  if (beam < 1 || beam > manifest.limits.max_beam)
    throw RequestError("beam must be an integer in 1.." + std::to_string(manifest.limits.max_beam) + " (the artifact's max_beam), got " + std::to_string(beam));
  if (k < 1 || k > beam) throw RequestError("k must be an integer in 1..beam (" + std::to_string(beam) + "), got " + std::to_string(k));
  if (count == 0) throw RequestError("no histories given: pass a list of item-id lists");
}

namespace {
HistoryError empty_history(std::size_t b) {
  return HistoryError("history " + std::to_string(b) + " is empty (after dropping unknown items): NEZHA needs at least one item");
}
}  // namespace

// Every history's items known (policy error), then at least one known item per history, before any work
// (the Python runtime's order: an unknown item anywhere is named before an empty history).
void Recommender::Impl::check_histories(const HistoryBatch& h, Unknown unknown) const {
  if (h.offsets[0] != 0) throw RequestError("history offsets must start at 0");
  for (std::size_t b = 0; b < h.count; ++b)
    if (h.offsets[b + 1] < h.offsets[b]) throw RequestError("history offsets must not decrease (history " + std::to_string(b) + ")");
  for (std::size_t b = 0; b < h.count && unknown == Unknown::error; ++b) {
    std::int64_t missing = 0;
    std::string listed;
    for (std::int64_t j = h.offsets[b]; j < h.offsets[b + 1]; ++j)
      if (tables.find_item(h.items[j]) < 0 && ++missing <= 5) listed += (listed.empty() ? "" : ", ") + std::to_string(h.items[j]);
    if (missing)
      throw HistoryError("history " + std::to_string(b) + " has item ids not in the catalog: [" + listed + "]" + (missing > 5 ? " ..." : "") +
                         " (pass unknown='skip' to drop them)");
  }
  for (std::size_t b = 0; b < h.count; ++b) {
    std::int64_t j = h.offsets[b];
    while (j < h.offsets[b + 1] && tables.find_item(h.items[j]) < 0) ++j;
    if (j == h.offsets[b + 1]) throw empty_history(b);
  }
}

// Histories [first, first + count) of a flat batch -> kept [count, max_history] (each kept item's L codes,
// newest first) and kept_count: the most recent max_history items j for which codes_of(j) is not null.
namespace {
template <typename CodesOf>
void keep_rows(Workspace& ws, const std::int64_t* offsets, std::size_t first, std::size_t count, std::int64_t max_history,
               CodesOf codes_of) {
  for (std::size_t b = 0; b < count; ++b) {
    const std::size_t u = first + b;
    const std::int64_t** kept = ws.kept.get() + b * std::size_t(max_history);
    std::int64_t n = 0;
    for (std::int64_t j = offsets[u + 1] - 1; j >= offsets[u] && n < max_history; --j)
      if (const std::int64_t* codes = codes_of(j)) kept[n++] = codes;
    ws.kept_count[b] = std::int32_t(n);                           // >= 1 (check_histories, check_codes)
  }
}
}  // namespace

// Item histories: codes from the catalog. Unknown items are skipped here: check_histories refused them
// already under the "error" policy.
void Recommender::Impl::keep(Workspace& ws, const HistoryBatch& h, std::size_t first, std::size_t count) const {
  keep_rows(ws, h.offsets, first, count, manifest.limits.max_history, [&](std::int64_t j) -> const std::int64_t* {
    const std::int64_t row = tables.find_item(h.items[j]);
    return row >= 0 ? tables.item_codes.data() + std::size_t(row) * std::size_t(L) : nullptr;
  });
}

// Code histories: offsets well formed, every history non-empty, every code inside its level's codebook.
void Recommender::Impl::check_codes(const CodeBatch& h) const {
  if (h.offsets[0] != 0) throw RequestError("code history offsets must start at 0");
  for (std::size_t b = 0; b < h.count; ++b) {
    if (h.offsets[b + 1] < h.offsets[b]) throw RequestError("code history offsets must not decrease (history " + std::to_string(b) + ")");
    if (h.offsets[b + 1] == h.offsets[b]) throw empty_history(b);
    for (std::int64_t j = h.offsets[b] * L; j < h.offsets[b + 1] * L; ++j) {
      const std::int64_t C = manifest.layout.codes[std::size_t(j % L)];
      if (h.codes[j] < 0 || h.codes[j] >= C)
        throw HistoryError("history " + std::to_string(b) + " item " + std::to_string(j / L - h.offsets[b]) + ": code " + std::to_string(h.codes[j]) +
                    " at level " + std::to_string(j % L) + " is outside 0.." + std::to_string(C - 1));
    }
  }
}

// Code histories: the caller's rows as they are (check_codes checked them).
void Recommender::Impl::keep_codes(Workspace& ws, const CodeBatch& h, std::size_t first, std::size_t count) const {
  keep_rows(ws, h.offsets, first, count, manifest.limits.max_history, [&](std::int64_t j) { return h.codes + j * L; });
}

// The backbone for the B kept rows -> hidden_all [B, L+1, H], run once per distinct history length with
// no padding (runtime/decode.py, backbone_by_length): each row is bit for bit what it gives alone. A run's
// input_ids are the rows' code tokens, oldest kept item first, then the L placeholders.
void Recommender::Impl::backbone(Workspace& ws, std::size_t B, Clock::time_point& t0) const {
  const Layout& layout = manifest.layout;
  const std::size_t max_history = std::size_t(manifest.limits.max_history), stride = std::size_t(L + 1) * std::size_t(H);
  for (std::int32_t n = 1; n <= std::int32_t(max_history); ++n) {
    const std::int64_t T = (n + 1) * L;
    std::size_t rows = 0;
    for (std::size_t b = 0; b < B; ++b) {
      if (ws.kept_count[b] != n) continue;
      const std::int64_t* const* kept = ws.kept.get() + b * max_history;
      std::int64_t* ids = ws.input_ids.get() + rows * std::size_t(T);
      std::int64_t t = 0;
      for (std::int64_t m = n - 1; m >= 0; --m)
        for (int l = 0; l < L; ++l) ids[t++] = kept[m][l] + layout.offsets[std::size_t(l)];
      for (int l = 0; l < L; ++l) ids[t++] = layout.placeholder_start + l;
      ws.run_rows[rows++] = std::int32_t(b);
    }
    if (rows == 0) continue;
    std::fill(ws.attention_mask.get(), ws.attention_mask.get() + rows * std::size_t(T), 1);
    stage(ws, s_encode(), t0);
    const std::int64_t dims[2] = {std::int64_t(rows), T};          // dim names sorted: batch, tokens
    ws.runners[0]->run(dims);                                       // hidden_run [rows, L+1, H]
    for (std::size_t r = 0; r < rows; ++r)
      std::memcpy(ws.hidden_all.get() + std::size_t(ws.run_rows[r]) * stride, ws.hidden_run.get() + r * stride, stride * sizeof(float));
    stage(ws, s_backbone(), t0);
  }
}

// expand: level `level`'s head on the B * K beams. Level 0: the roots hidden[:, 0] [B, H]. Level > 0: the
// parents (beams of the previous level's B * K_prev that have children, ascending) copied to parent_state
// [P, H] (level 1: the roots; else their state), each beam's row of it in parent_row [N]; the code [N] was
// written by select. hidden [N, H] = hidden[user, 1 + level]. Runs the head -> log_probs [N, C] and, at
// levels 1 .. L-2, state [N, H]: the recurrent matmul runs on the P parents inside the graph.
void Recommender::Impl::expand(Workspace& ws, int level, std::size_t B, std::int64_t K, std::int64_t K_prev) const {
  const std::int64_t N = std::int64_t(B) * K;
  const std::size_t row = std::size_t(H) * sizeof(float), stride = std::size_t(L + 1) * std::size_t(H);
  const float* hidden_all = ws.hidden_all.get();
  std::int64_t dims[2] = {N, 0};                                   // dim names sorted: beams, parents
  if (level == 0) {
    for (std::size_t b = 0; b < B; ++b) std::memcpy(ws.parent_state.get() + b * std::size_t(H), hidden_all + b * stride, row);
  } else {
    const std::int64_t N_prev = std::int64_t(B) * K_prev;
    std::int32_t* slot = ws.slot.get();
    std::fill(slot, slot + N_prev, -1);
    for (std::int64_t n = 0; n < N; ++n) slot[ws.parent[n]] = 0;   // mark the beams that have children
    std::int32_t P = 0;
    for (std::int64_t p = 0; p < N_prev; ++p) {
      if (slot[p] < 0) continue;
      const float* src = level == 1 ? hidden_all + std::size_t(p) * stride : ws.state.get() + std::size_t(p) * std::size_t(H);
      std::memcpy(ws.parent_state.get() + std::size_t(P) * std::size_t(H), src, row);
      slot[p] = P++;
    }
    for (std::int64_t n = 0; n < N; ++n) ws.parent_row[n] = slot[ws.parent[n]];
    dims[1] = P;
  }
  for (std::int64_t n = 0; n < N; ++n)
    std::memcpy(ws.hidden.get() + std::size_t(n * H), hidden_all + std::size_t(n / K) * stride + std::size_t(1 + level) * std::size_t(H), row);
  ws.runners[std::size_t(1 + level)]->run(dims);
}

// verify: user b's candidates [m] (summed score, flat index parent * C + code) over its K beams, only the
// children whose prefix exists (dense bitmap row or hash set). Returns m.
std::int64_t Recommender::Impl::verify(Workspace& ws, int level, std::size_t b, std::int64_t K) const {
  const std::int64_t C = manifest.layout.codes[std::size_t(level)];
  Candidate* cand = ws.candidates.get();
  std::int64_t m = 0;
  for (std::int64_t p = 0; p < K; ++p) {
    const std::int64_t n = std::int64_t(b) * K + p;
    const float parent_score = ws.scores[n];
    if (parent_score == -std::numeric_limits<float>::infinity()) continue;   // -inf children: never results
    const float* lp = ws.log_probs.get() + std::size_t(n * C);
    const std::int32_t base = std::int32_t(p * C);
    if (verifier->dense(level)) {
      const std::uint64_t* valid = verifier->row(level, ws.keys[n]);
      for (std::int64_t w = 0; w * 64 < C; ++w)
        for (std::uint64_t bits = valid[w]; bits; bits &= bits - 1) {        // the set bits: valid codes
          const std::int64_t c = w * 64 + __builtin_ctzll(bits);
          cand[m++] = Candidate{parent_score + lp[c], base + std::int32_t(c)};
        }
    } else {
      const std::uint64_t key0 = ws.keys[n] * std::uint64_t(C);
      for (std::int64_t c = 0; c < C; ++c)
        if (verifier->contains(level, key0 + std::uint64_t(c))) cand[m++] = Candidate{parent_score + lp[c], base + std::int32_t(c)};
    }
  }
  return m;
}

// select: user b's K_next best of its m candidates (score desc, flat index asc; slots beyond m are -inf)
// -> next_scores, next_keys, parent [B * K_next] and code, the next head's input.
void Recommender::Impl::select(Workspace& ws, int level, std::size_t b, std::int64_t K, std::int64_t K_next, std::int64_t m) const {
  const std::int64_t C = manifest.layout.codes[std::size_t(level)];
  Candidate* cand = ws.candidates.get();
  const std::int64_t take = std::min(m, K_next);
  std::partial_sort(cand, cand + take, cand + m, Better{});          // a heap of the best: one compare per candidate, mostly
  for (std::int64_t j = 0; j < K_next; ++j) {
    const std::size_t out = b * std::size_t(K_next) + std::size_t(j);
    const Candidate c = j < take ? cand[j] : Candidate{-std::numeric_limits<float>::infinity(), 0};
    const std::int64_t parent = std::int64_t(b) * K + c.index / C, code = c.index % C;
    ws.next_scores[out] = c.score;
    ws.next_keys[out] = ws.keys[parent] * std::uint64_t(C) + std::uint64_t(code);
    ws.parent[out] = std::int32_t(parent);
    ws.code[out] = code;
  }
}

// Beam search of width `beam` for the B rows of hidden_all (runtime/decode.py, beam_search): per level
// expand, verify, select. Leaves per user K (returned) beams: ws.keys [B, K] SID keys and ws.scores
// [B, K] summed log-probs, best first, -inf where no valid SID was found.
std::int64_t Recommender::Impl::decode(Workspace& ws, std::size_t B, int beam) const {
  Clock::time_point t0 = ws.timing ? Clock::now() : Clock::time_point{};
  std::int64_t K = 1, K_prev = 1;                                   // beams per user: this level's, the last
  std::fill(ws.scores.get(), ws.scores.get() + B, 0.0f);
  std::fill(ws.keys.get(), ws.keys.get() + B, 0);
  for (int level = 0; level < L; ++level) {
    expand(ws, level, B, K, K_prev);
    stage(ws, s_head(level), t0);
    const std::int64_t K_next = std::min<std::int64_t>(beam, K * manifest.layout.codes[std::size_t(level)]);
    for (std::size_t b = 0; b < B; ++b) {
      const std::int64_t m = verify(ws, level, b, K);
      stage(ws, s_verify(level), t0);
      select(ws, level, b, K, K_next, m);
      stage(ws, s_select(), t0);
    }
    std::swap(ws.scores, ws.next_scores);
    std::swap(ws.keys, ws.next_keys);
    K_prev = K;
    K = K_next;
  }
  return K;
}

void Recommender::recommend_into(const HistoryBatch& h, int k, int beam, Unknown unknown, const ResultArrays& out) {
  Impl& im = *impl_;
  if (beam == 0) {                                  // the default; k is checked against max_beam first
    if (k < 1 || k > max_beam())
      throw RequestError("k must be an integer in 1..beam (" + std::to_string(max_beam()) + "), got " + std::to_string(k));
    beam = default_beam(k);
  }
  im.check_request(h.count, k, beam);
  im.check_histories(h, unknown);
  Workspace& ws = im.workspace();
  im.decode_chunks(ws, h.count, beam, [&](std::size_t first, std::size_t B) { im.keep(ws, h, first, B); },
                   [&](std::size_t first, std::size_t B, std::int64_t K) {
                     for (std::size_t u = first; u < first + B; ++u)
                       out.lengths[u] = im.write_items(ws, u - first, K, k, out.items + u * std::size_t(k), out.scores + u * std::size_t(k));
                   });
}

// items: user b's SIDs (K beams left by decode) -> up to k (item, score), best first: items of one SID share
// its score, ascending by id; stops at the first -inf. Returns how many were written.
std::int32_t Recommender::Impl::write_items(const Workspace& ws, std::size_t b, std::int64_t K, std::int32_t k, std::int64_t* items,
                                            float* scores) const {
  const Tables& t = tables;
  std::int32_t n = 0;
  for (std::int64_t j = 0; j < K && n < k; ++j) {
    const float score = ws.scores[b * std::size_t(K) + std::size_t(j)];
    if (!std::isfinite(score)) break;
    const std::uint64_t key = ws.keys[b * std::size_t(K) + std::size_t(j)];
    auto it = std::lower_bound(t.sid_keys.begin(), t.sid_keys.end(), key);
    if (it == t.sid_keys.end() || *it != key) continue;
    const std::size_t s = std::size_t(it - t.sid_keys.begin());
    for (std::int64_t i = t.sid_offsets[s]; i < t.sid_offsets[s + 1] && n < k; ++i, ++n) {
      items[n] = t.sid_items[std::size_t(i)];
      scores[n] = score;
    }
  }
  return n;
}

void Recommender::Impl::check_ks(const std::int32_t* ks, std::size_t count, int beam) const {
  if (!ks) throw RequestError("ks is NULL");
  for (std::size_t b = 0; b < count; ++b)
    if (ks[b] < 1 || ks[b] > beam)
      throw RequestError("k must be an integer in 1..beam (" + std::to_string(beam) + "), got " + std::to_string(ks[b]) + " (history " +
                         std::to_string(b) + ")");
}

void Recommender::item_codes_into(const HistoryBatch& h, Unknown unknown, std::int64_t* codes, std::int64_t* code_offsets) const {
  const Impl& im = *impl_;
  if (h.count == 0) throw RequestError("no histories given: pass a list of item-id lists");
  im.check_histories(h, unknown);
  const std::size_t L = std::size_t(im.L);
  std::int64_t rows = 0;
  code_offsets[0] = 0;
  for (std::size_t b = 0; b < h.count; ++b) {
    for (std::int64_t j = h.offsets[b]; j < h.offsets[b + 1]; ++j) {
      const std::int64_t row = im.tables.find_item(h.items[j]);
      if (row < 0) continue;                                        // skipped: check_histories refused it under Unknown::error
      std::memcpy(codes + std::size_t(rows++) * L, im.tables.item_codes.data() + std::size_t(row) * L, L * sizeof(std::int64_t));
    }
    code_offsets[b + 1] = rows;
  }
}

void Recommender::decode_batch_into(const CodeBatch& h, int beam, const std::int32_t* ks, const ResultArrays& out) {
  Impl& im = *impl_;
  im.check_request(h.count, 1, beam);
  im.check_ks(ks, h.count, beam);
  im.check_codes(h);
  Workspace& ws = im.workspace();
  std::size_t at = 0;                                               // ks[0] + .. + ks[u-1]
  im.decode_chunks(ws, h.count, beam, [&](std::size_t first, std::size_t B) { im.keep_codes(ws, h, first, B); },
                   [&](std::size_t first, std::size_t B, std::int64_t K) {
                     for (std::size_t u = first; u < first + B; at += std::size_t(ks[u++]))
                       out.lengths[u] = im.write_items(ws, u - first, K, ks[u], out.items + at, out.scores + at);
                   });
}

std::int64_t Recommender::decode_codes_into(const CodeBatch& h, int beam, const SidArrays& out) {
  Impl& im = *impl_;
  im.check_request(h.count, 1, beam);
  im.check_codes(h);
  Workspace& ws = im.workspace();
  std::int64_t K = 0;                                               // the same for every chunk: beam and codebooks fix it
  im.decode_chunks(ws, h.count, beam, [&](std::size_t first, std::size_t B) { im.keep_codes(ws, h, first, B); },
                   [&](std::size_t first, std::size_t B, std::int64_t K_chunk) {
                     K = K_chunk;
                     for (std::size_t b = 0; b < B; ++b)
                       for (std::int64_t j = 0; j < beam; ++j) {
                         const std::size_t at = (first + b) * std::size_t(beam) + std::size_t(j), from = b * std::size_t(K) + std::size_t(j);
                         out.keys[at] = j < K ? ws.keys[from] : 0;
                         out.scores[at] = j < K ? ws.scores[from] : -std::numeric_limits<float>::infinity();
                       }
                   });
  return K;
}

void Recommender::backbone_only(const HistoryBatch& h, Unknown unknown) {
  Impl& im = *impl_;
  if (h.count == 0) throw RequestError("no histories given: pass a list of item-id lists");
  Workspace& ws = im.workspace();
  Clock::time_point t0 = ws.timing ? Clock::now() : Clock::time_point{};
  im.check_histories(h, unknown);
  for (std::size_t first = 0; first < h.count; first += std::size_t(im.manifest.limits.max_batch)) {
    const std::size_t B = std::min(h.count - first, std::size_t(im.manifest.limits.max_batch));
    im.keep(ws, h, first, B);
    im.stage(ws, im.s_encode(), t0);
    im.backbone(ws, B, t0);
  }
}

std::vector<std::vector<ScoredItem>> Recommender::recommend(const std::vector<std::vector<std::int64_t>>& histories, int k,
                                                            int beam, Unknown unknown) {
  std::vector<std::int64_t> items, offsets{0};
  for (const auto& h : histories) {
    items.insert(items.end(), h.begin(), h.end());
    offsets.push_back(std::int64_t(items.size()));
  }
  const std::size_t width = k > 0 ? std::size_t(k) : 0;
  std::vector<std::int64_t> out_items(histories.size() * width);
  std::vector<float> out_scores(histories.size() * width);
  std::vector<std::int32_t> lengths(histories.size());
  recommend_into(HistoryBatch{items.data(), offsets.data(), histories.size()}, k, beam, unknown,
                 ResultArrays{out_items.data(), out_scores.data(), lengths.data()});
  std::vector<std::vector<ScoredItem>> out(histories.size());
  for (std::size_t b = 0; b < histories.size(); ++b)
    for (std::int32_t j = 0; j < lengths[b]; ++j) out[b].push_back({out_items[b * width + std::size_t(j)], out_scores[b * width + std::size_t(j)]});
  return out;
}

}  // namespace nezha
