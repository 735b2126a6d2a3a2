#include "nezha/nezha_c.h"

#include <cstring>
#include <new>
#include <string>

#include "nezha/recommender.h"
#include "tables.h"

struct nezha_recommender {
  std::unique_ptr<nezha::Recommender> rec;
};

namespace {

thread_local std::string g_error;
thread_local int g_kind = NEZHA_OK;

int fail(int kind, std::string message) {
  g_kind = kind;
  g_error = std::move(message);
  return kind;
}

// Runs `f`, turning every exception into its nezha_error_kind and this thread's error message: nothing
// crosses the C ABI.
template <typename F>
int guarded(F&& f) {
  try {
    g_error.clear();
    g_kind = NEZHA_OK;
    f();
    return NEZHA_OK;
  } catch (const nezha::RequestError& e) {
    return fail(NEZHA_ERROR_REQUEST, e.what());
  } catch (const nezha::HistoryError& e) {
    return fail(NEZHA_ERROR_HISTORY, e.what());
  } catch (const nezha::OptionError& e) {
    return fail(NEZHA_ERROR_OPTION, e.what());
  } catch (const nezha::RunError& e) {
    return fail(NEZHA_ERROR_RUN, e.what());
  } catch (const nezha::Error& e) {
    return fail(NEZHA_ERROR_ARTIFACT, e.what());
  } catch (const std::bad_alloc&) {
    return fail(NEZHA_ERROR_INTERNAL, "out of memory");
  } catch (const std::exception& e) {
    return fail(NEZHA_ERROR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(NEZHA_ERROR_INTERNAL, "internal error: unknown exception");
  }
}

bool check_handle(const void* r) {
  if (r) return true;
  fail(NEZHA_ERROR_REQUEST, "null recommender handle");
  return false;
}

}  // namespace

extern "C" {

const char* nezha_last_error(void) { return g_error.c_str(); }

int nezha_last_error_kind(void) { return g_kind; }

nezha_recommender* nezha_load(const char* artifact_dir, const char* precision, int intra_op_threads, int verify,
                              int64_t dense_budget_bytes, const char* onnxruntime_library) {
  nezha_recommender* out = nullptr;
  guarded([&] {
    if (!artifact_dir) throw nezha::OptionError("artifact_dir is NULL");
    if (dense_budget_bytes < 0) throw nezha::OptionError("dense_budget_bytes must be >= 0");
    nezha::Options o;
    o.precision = precision ? precision : "";
    o.intra_op_threads = intra_op_threads;
    o.verify = verify != 0;
    o.dense_budget_bytes = std::size_t(dense_budget_bytes);
    o.onnxruntime_library = onnxruntime_library ? onnxruntime_library : "";
    auto rec = nezha::Recommender::load(artifact_dir, o);
    out = new nezha_recommender{std::move(rec)};
  });
  return out;
}

void nezha_free(nezha_recommender* r) { delete r; }

int nezha_check_artifact(const char* artifact_dir, int verify) {
  return guarded([&] {
    if (!artifact_dir) throw nezha::OptionError("artifact_dir is NULL");
    nezha::check_artifact(artifact_dir, verify != 0);
  });
}

int nezha_recommend(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int k, int beam,
                    int unknown_skip, int64_t* out_items, float* out_scores, int32_t* out_lengths) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] {
    if (!offsets || !out_items || !out_scores || !out_lengths || (!items && count && offsets[count] > 0))
      throw nezha::RequestError("nezha_recommend: NULL array");
    r->rec->recommend_into(nezha::HistoryBatch{items, offsets, count}, k, beam,
                           unknown_skip ? nezha::Unknown::skip : nezha::Unknown::error,
                           nezha::ResultArrays{out_items, out_scores, out_lengths});
  });
}

int nezha_decode_codes(nezha_recommender* r, const int64_t* codes, const int64_t* offsets, size_t count, int beam,
                       uint64_t* out_keys, float* out_scores, int64_t* out_width) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] {
    if (!offsets || !codes || !out_keys || !out_scores || !out_width) throw nezha::RequestError("nezha_decode_codes: NULL array");
    *out_width = r->rec->decode_codes_into(nezha::CodeBatch{codes, offsets, count}, beam, nezha::SidArrays{out_keys, out_scores});
  });
}

int nezha_item_codes(const nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count,
                     int unknown_skip, int64_t* out_codes, int64_t* out_code_offsets) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] {
    if (!offsets || !out_code_offsets || ((!items || !out_codes) && count && offsets[count] > 0))
      throw nezha::RequestError("nezha_item_codes: NULL array");
    r->rec->item_codes_into(nezha::HistoryBatch{items, offsets, count}, unknown_skip ? nezha::Unknown::skip : nezha::Unknown::error,
                            out_codes, out_code_offsets);
  });
}

int nezha_decode_batch(nezha_recommender* r, const int64_t* codes, const int64_t* offsets, size_t count, int beam,
                       const int32_t* ks, int64_t* out_items, float* out_scores, int32_t* out_lengths) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] {
    if (!offsets || !codes || !ks || !out_items || !out_scores || !out_lengths) throw nezha::RequestError("nezha_decode_batch: NULL array");
    r->rec->decode_batch_into(nezha::CodeBatch{codes, offsets, count}, beam, ks, nezha::ResultArrays{out_items, out_scores, out_lengths});
  });
}

int64_t nezha_item_count(const nezha_recommender* r) { return r ? r->rec->item_count() : 0; }

int nezha_codebook_size(const nezha_recommender* r, int level) { return r ? r->rec->codebook_size(level) : 0; }

int nezha_backbone(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int unknown_skip) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] {
    if (!offsets) throw nezha::RequestError("nezha_backbone: NULL offsets");
    r->rec->backbone_only(nezha::HistoryBatch{items, offsets, count}, unknown_skip ? nezha::Unknown::skip : nezha::Unknown::error);
  });
}

int nezha_info(const nezha_recommender* r, int* levels, int* max_history, int* max_batch, int* max_beam) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  if (levels) *levels = r->rec->levels();
  if (max_history) *max_history = r->rec->max_history();
  if (max_batch) *max_batch = r->rec->max_batch();
  if (max_beam) *max_beam = r->rec->max_beam();
  return 0;
}

const char* nezha_precision(const nezha_recommender* r) { return r ? r->rec->precision().c_str() : ""; }

const char* nezha_verifier_kind(const nezha_recommender* r, int level) {
  if (!r || level < 0 || level >= r->rec->levels()) return "";
  return r->rec->verifier_kinds()[std::size_t(level)].c_str();
}

int nezha_set_stage_timing(nezha_recommender* r, int enabled) {
  if (!check_handle(r)) return NEZHA_ERROR_REQUEST;
  return guarded([&] { r->rec->set_stage_timing(enabled != 0); });
}

int nezha_stage_seconds(nezha_recommender* r, double* seconds, int capacity, char* names, size_t names_size) {
  if (!check_handle(r)) return -1;
  int n = -1;
  guarded([&] {
    const auto stages = r->rec->take_stage_seconds();
    std::string joined;
    for (std::size_t i = 0; i < stages.size(); ++i) {
      if (int(i) < capacity && seconds) seconds[i] = stages[i].second;
      joined += (i ? "\n" : "") + stages[i].first;
    }
    if (names && names_size) {
      const std::size_t len = std::min(joined.size(), names_size - 1);
      std::memcpy(names, joined.data(), len);
      names[len] = '\0';
    }
    n = int(stages.size());
  });
  return n;
}

int64_t nezha_rebinds(nezha_recommender* r) {
  if (!check_handle(r)) return -1;
  int64_t n = -1;
  guarded([&] { n = r->rec->rebinds(); });
  return n;
}

}  // extern "C"
