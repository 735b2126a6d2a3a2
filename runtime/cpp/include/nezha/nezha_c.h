/* A C ABI over nezha::Recommender: what the Python binding (ctypes) and services in other languages call.
 * Every function that can fail returns 0 on success and -1 on error (NULL for nezha_load); the error's
 * message is then nezha_last_error(), per thread. No function throws or aborts on a user error. */
#ifndef NEZHA_C_H
#define NEZHA_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nezha_recommender nezha_recommender;

/* The message of this thread's last error ("" if none); valid until the thread's next call. */
const char* nezha_last_error(void);

/* precision, onnxruntime_library: NULL or "" for the defaults (see nezha::Options). */
nezha_recommender* nezha_load(const char* artifact_dir, const char* precision, int intra_op_threads, int verify,
                              int64_t dense_budget_bytes, const char* onnxruntime_library);
void nezha_free(nezha_recommender* r);

/* History b is items[offsets[b] .. offsets[b+1]); writes out_items/out_scores [count, k] and
 * out_lengths [count]. beam 0: the default max(k, 20) capped at max_beam. unknown_skip: 0 = error. */
int nezha_recommend(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int k, int beam,
                    int unknown_skip, int64_t* out_items, float* out_scores, int32_t* out_lengths);

/* Beam search from code histories: history b is rows offsets[b] .. offsets[b+1] of codes [offsets[count], L]
 * (each item's L codes). Writes out_keys (SID prefix keys) and out_scores [count, beam], best first, and
 * *out_width: the slots per history filled (the rest: key 0, score -inf). */
int nezha_decode_codes(nezha_recommender* r, const int64_t* codes, const int64_t* offsets, size_t count, int beam,
                       uint64_t* out_keys, float* out_scores, int64_t* out_width);

/* levels, max_history, max_batch, max_beam (any pointer may be NULL). */
int nezha_info(const nezha_recommender* r, int* levels, int* max_history, int* max_batch, int* max_beam);
const char* nezha_precision(const nezha_recommender* r);
const char* nezha_verifier_kind(const nezha_recommender* r, int level);   /* "dense" or "hash" */

#ifdef __cplusplus
}
#endif
#endif
