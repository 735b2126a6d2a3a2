/* NOT a stable API: the hooks of the tests and the benchmark (tests/test_cpp_*.py, tests/manifest_corpus.py,
 * nezha bench --backends cpp), which may change or go in any release. An embedder needs only nezha_c.h.
 * Same conventions: 0 on success, -1 on error with nezha_last_error(). */
#ifndef NEZHA_TESTING_H
#define NEZHA_TESTING_H

#include "nezha/nezha_c.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The checks nezha_load makes before ONNX Runtime (manifest, folder, sha256 if `verify`, contract.json,
 * tables): 0 if the artifact passes, else -1 and nezha_last_error(). Loads no ONNX Runtime. */
int nezha_check_artifact(const char* artifact_dir, int verify);

/* The latency floor: encode + one backbone run, results discarded. */
int nezha_backbone(nezha_recommender* r, const int64_t* items, const int64_t* offsets, size_t count, int unknown_skip);

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
