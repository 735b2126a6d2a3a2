// ONNX Runtime through its C++ API, with the library opened at run time (dlopen + ORT_API_MANUAL_INIT):
// sessions shared by all threads, and per thread one IoBinding per graph bound to that thread's buffers,
// rebound only when a dynamic dim changes. Threading as runtime/backends/onnxruntime.py: spinning off,
// one inter-op thread, configurable intra-op threads.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.h"

namespace nezha {

// Opens ONNX Runtime once per process (see Options::onnxruntime_library); returns the library path.
std::string load_onnxruntime(const std::string& requested);

namespace detail {
// Depth of ONNX Runtime calls on this thread: the allocation test counts only the runtime's own
// allocations, outside ONNX Runtime (whose internals are not ours to prove).
extern thread_local int ort_call_depth;
}  // namespace detail

struct Sessions {
  Sessions(const std::string& root, const std::string& precision, const Manifest& manifest, int intra_op_threads);
  Ort::Env env;
  std::vector<std::unique_ptr<Ort::Session>> by_graph;      // backbone, head_0 .. (graph_names order)
};

// One graph on one thread: tensors bound to caller-owned buffers.
class GraphRunner {
 public:
  // `buffers[i]` is the host buffer of the graph's i-th tensor (inputs then outputs), large enough for
  // the manifest's largest shape.
  GraphRunner(Ort::Session& session, const GraphEntry& entry, std::vector<void*> buffers);
  // Runs with the dynamic dims `dims` (values in the order of `dim_names()`); rebinds only if they changed.
  void run(const std::int64_t* dims);
  const std::vector<std::string>& dim_names() const { return dim_names_; }
  std::int64_t rebinds() const { return rebinds_; }

 private:
  void bind(const std::int64_t* dims);
  Ort::Session& session_;
  const GraphEntry& entry_;
  std::vector<void*> buffers_;
  std::vector<std::string> dim_names_;
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges_;   // [lo, hi] per dim name
  std::vector<std::int64_t> bound_dims_;
  std::vector<Ort::Value> values_;          // per tensor (inputs then outputs), kept alive while bound
  std::vector<std::vector<std::int64_t>> shapes_;   // the shape each is bound with
  std::vector<std::int64_t> shape_;                 // scratch
  Ort::IoBinding binding_;
  Ort::RunOptions run_options_;
  Ort::MemoryInfo cpu_;
  std::int64_t rebinds_ = 0;
};

}  // namespace nezha
