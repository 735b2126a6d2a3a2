/* A C ABI over nezha::Recommender: what the Python binding (ctypes) and services in other languages call.
 * Every function that can fail returns 0 (NEZHA_OK) on success, else the kind of error (nezha_error_kind;
 * NULL for nezha_load, then nezha_last_error_kind()); the error's message is then nezha_last_error(), per
 * thread. No function throws or aborts on a user error. */
#ifndef NEZHA_C_H
#define NEZHA_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nezha_recommender nezha_recommender;

/* What went wrong: a caller's own mistake (request, history, option), the artifact, or the machine. */
typedef enum nezha_error_kind {
  NEZHA_OK = 0,
  NEZHA_ERROR_REQUEST = 1,   /* k, beam, an empty batch, malformed offsets or NULL arrays */
  NEZHA_ERROR_HISTORY = 2,   /* a history that cannot be encoded: unknown items, empty, codes outside a codebook */
  NEZHA_ERROR_OPTION = 3,    /* a load option outside what is allowed (precision name, threads, budget) */
  NEZHA_ERROR_ARTIFACT = 4,  /* an artifact the loader refuses (manifest, files, sha256, tables, graphs) */
  NEZHA_ERROR_RUN = 5,       /* a graph that failed while running (ONNX Runtime) */
  NEZHA_ERROR_INTERNAL = 6   /* out of memory or a bug */
} nezha_error_kind;

/* The kind of this thread's last error (NEZHA_OK if none). */
int nezha_last_error_kind(void);

/* The message of this thread's last error ("" if none); valid until the thread's next call. */
const char* nezha_last_error(void);

/* precision, onnxruntime_library: NULL or "" for the defaults (see nezha::Options). */
nezha_recommender* nezha_load(const char* artifact_dir, const char* precision, int intra_op_threads, int verify,
                              int64_t dense_budget_bytes, const char* onnxruntime_library);
void nezha_free(nezha_recommender* r);

/* The checks nezha_load makes before ONNX Runtime (manifest, folder, sha256 if `verify`, contract.json,
 * tables): 0 if the artifact passes, else -1 and nezha_last_error(). Loads no ONNX Runtime. */
int nezha_check_artifact(const char* artifact_dir, int verify);

/* History b is items[offsets[b] .. offsets[b+1]); writes out_items/out_scores [count, k] and
 * out_lengths [count]. beam 0: the default max(k, 20) capped at max_beam. unknown_skip: 0 = error. */
int nezha_recommend(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int k, int beam,
                    int unknown_skip, int64_t* out_items, float* out_scores, int32_t* out_lengths);

/* Beam search from code histories: history b is rows offsets[b] .. offsets[b+1] of codes [offsets[count], L]
 * (each item's L codes). Writes out_keys (SID prefix keys) and out_scores [count, beam], best first, and
 * *out_width: the slots per history filled (the rest: key 0, score -inf). */
int nezha_decode_codes(nezha_recommender* r, const int64_t* codes, const int64_t* offsets, size_t count, int beam,
                       uint64_t* out_keys, float* out_scores, int64_t* out_width);

/* The catalog lookup with the unknown-item policy (what nezha_recommend checks and encodes): history b
 * is items[offsets[b] .. offsets[b+1]); writes each kept item's L codes to out_codes (room for
 * offsets[count] items) and out_code_offsets [count + 1] (history b: rows out_code_offsets[b] ..
 * out_code_offsets[b+1]). Unknown items (unknown_skip 0) or a history left empty: NEZHA_ERROR_HISTORY. */
int nezha_item_codes(const nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count,
                     int unknown_skip, int64_t* out_codes, int64_t* out_code_offsets);

/* Beam search from code histories (as nezha_decode_codes), then SIDs -> items with k = ks[b] per history
 * (1..beam): writes history b's up to ks[b] items and scores, best first, at out_items/out_scores
 * [ks[0] + .. + ks[b-1] ..] and their count at out_lengths[b]. Each history's answer is its answer alone. */
int nezha_decode_batch(nezha_recommender* r, const int64_t* codes, const int64_t* offsets, size_t count, int beam,
                       const int32_t* ks, int64_t* out_items, float* out_scores, int32_t* out_lengths);

/* Items in the catalog, and the codes at `level` (0 on a NULL handle or a level outside 0..levels-1). */
int64_t nezha_item_count(const nezha_recommender* r);
int nezha_codebook_size(const nezha_recommender* r, int level);

/* The latency floor: encode + one backbone run, results discarded. */
int nezha_backbone(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int unknown_skip);

/* levels, max_history, max_batch, max_beam (any pointer may be NULL). */
int nezha_info(const nezha_recommender* r, int* levels, int* max_history, int* max_batch, int* max_beam);
const char* nezha_precision(const nezha_recommender* r);
const char* nezha_verifier_kind(const nezha_recommender* r, int level);   /* "dense" or "hash" */

/* Stage timing of the calling thread (off by default). nezha_stage_seconds writes up to `capacity`
 * (name, seconds) pairs, names separated by '\n' into `names` (of `names_size` bytes), resets the
 * counters and returns how many stages there are (-1 on error). */
int nezha_set_stage_timing(nezha_recommender* r, int enabled);
int nezha_stage_seconds(nezha_recommender* r, double* seconds, int capacity, char* names, size_t names_size);

/* ONNX Runtime rebinds of the calling thread's bindings so far (-1 on error). */
int64_t nezha_rebinds(nezha_recommender* r);

#ifdef __cplusplus
}
#endif
#endif
