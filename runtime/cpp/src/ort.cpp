#include "ort.h"

#include <dlfcn.h>

#include <algorithm>

#include <cstdlib>
#include <mutex>

#include "files.h"
#include "nezha/recommender.h"

#ifndef NEZHA_DEFAULT_ONNXRUNTIME_LIBRARY
#define NEZHA_DEFAULT_ONNXRUNTIME_LIBRARY ""
#endif

namespace nezha {

namespace detail {
thread_local int ort_call_depth = 0;
}  // namespace detail

namespace {

struct OrtCall {                            // marks ONNX Runtime's own work on this thread
  OrtCall() { ++detail::ort_call_depth; }
  ~OrtCall() { --detail::ort_call_depth; }
};

std::mutex g_load_mutex;
std::string g_loaded;                       // the library this process uses ("" until loaded)

ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  throw Error("tensor dtype " + dtype + "; the graphs' inputs and outputs are float32 or int64");
}

}  // namespace

std::string load_onnxruntime(const std::string& requested) {
  std::lock_guard<std::mutex> lock(g_load_mutex);
  std::string path = requested;
  if (path.empty() && std::getenv("NEZHA_ONNXRUNTIME_LIBRARY")) path = std::getenv("NEZHA_ONNXRUNTIME_LIBRARY");
  if (path.empty()) path = NEZHA_DEFAULT_ONNXRUNTIME_LIBRARY;
  if (path.empty()) path = "libonnxruntime.so.1";
  if (!g_loaded.empty()) {
    if (!requested.empty() && requested != g_loaded)
      throw Error("ONNX Runtime is already loaded from " + g_loaded + " in this process; cannot switch to " + requested);
    return g_loaded;
  }
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle)
    throw Error("cannot open ONNX Runtime's library " + path + ": " + dlerror() +
                " (pip install onnxruntime, then pass its capi/libonnxruntime.so.1.* as Options::onnxruntime_library or "
                "--onnxruntime-library, or set NEZHA_ONNXRUNTIME_LIBRARY)");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (!get_base) throw Error(path + " is not ONNX Runtime: it has no OrtGetApiBase");
  const OrtApiBase* base = get_base();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api)
    throw Error("ONNX Runtime " + std::string(base->GetVersionString()) + " at " + path + " does not offer C API version " +
                std::to_string(ORT_API_VERSION) + " (the headers this runtime was built with); use ONNX Runtime >= 1." +
                std::to_string(ORT_API_VERSION));
  Ort::InitApi(api);
  g_loaded = path;
  return path;                              // the library stays loaded for the life of the process
}

Sessions::Sessions(const std::string& root, const std::string& precision, const Manifest& manifest, int intra_op_threads)
    : env(ORT_LOGGING_LEVEL_ERROR, "nezha") {        // errors only, as runtime/backends/onnxruntime.py
  Ort::SessionOptions so;
  so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
  so.SetInterOpNumThreads(1);
  if (intra_op_threads > 0) so.SetIntraOpNumThreads(intra_op_threads);
  // Spinning pools, one per session, steal the cores the active session needs (runtime/backends/onnxruntime.py).
  so.AddConfigEntry("session.intra_op.allow_spinning", "0");
  so.AddConfigEntry("session.inter_op.allow_spinning", "0");
  for (const std::string& name : graph_names(manifest.layout.levels())) {
    const GraphEntry& g = manifest.graphs.at(precision).at(name);
    const std::string path = resolve_inside(root, g.file);
    try {
      by_graph.push_back(std::make_unique<Ort::Session>(env, path.c_str(), so));
    } catch (const Ort::Exception& e) {
      throw Error("ONNX Runtime cannot open graph " + precision + "/" + name + " (" + g.file + "): " + e.what());
    }
    // The graph ONNX Runtime opened must have the manifest's tensors: names in order, dtypes, fixed dims
    // (a dynamic dim of the manifest is a symbolic one in the graph). A lying manifest fails here, not later.
    Ort::Session& s = *by_graph.back();
    Ort::AllocatorWithDefaultOptions alloc;
    auto check = [&](const std::vector<TensorSpec>& specs, std::size_t count, bool inputs) {
      const std::string what = "graph " + precision + "/" + name + " (" + g.file + ")" + (inputs ? " input " : " output ");
      if (count != specs.size())
        throw Error(what.substr(0, what.size() - 1) + "s: " + std::to_string(count) + ", the manifest lists " + std::to_string(specs.size()));
      for (std::size_t i = 0; i < count; ++i) {
        auto n = inputs ? s.GetInputNameAllocated(i, alloc) : s.GetOutputNameAllocated(i, alloc);
        if (specs[i].name != n.get())
          throw Error(what + std::to_string(i) + " is " + n.get() + ", the manifest says " + specs[i].name);
        const Ort::TypeInfo type = inputs ? s.GetInputTypeInfo(i) : s.GetOutputTypeInfo(i);
        if (type.GetONNXType() != ONNX_TYPE_TENSOR) throw Error(what + specs[i].name + " is not a tensor");
        const auto info = type.GetTensorTypeAndShapeInfo();
        if (info.GetElementType() != element_type(specs[i].dtype))
          throw Error(what + specs[i].name + " has another element type than the manifest's " + specs[i].dtype);
        const std::vector<std::int64_t> dims = info.GetShape();
        std::vector<const char*> symbols(dims.size(), nullptr);
        info.GetSymbolicDimensions(symbols.data(), symbols.size());
        bool same = dims.size() == specs[i].shape.size() && symbols.size() == dims.size();
        for (std::size_t d = 0; same && d < dims.size(); ++d)
          same = specs[i].shape[d].name.empty() ? dims[d] == specs[i].shape[d].size
                                                : dims[d] < 0 && symbols[d] && specs[i].shape[d].name == symbols[d];
        if (!same) {
          std::string have;
          for (std::size_t d = 0; d < dims.size(); ++d)
            have += (have.empty() ? "" : ", ") + (dims[d] >= 0 ? std::to_string(dims[d]) : symbols[d] && *symbols[d] ? std::string(symbols[d]) : std::string("?"));
          throw Error(what + specs[i].name + " has shape [" + have + "], the manifest's dims differ");
        }
      }
    };
    check(g.inputs, s.GetInputCount(), true);
    check(g.outputs, s.GetOutputCount(), false);
    // The graph's own name (export/graphs.py writes it): heads of one interface cannot be swapped.
    const std::string described = s.GetModelMetadata().GetDescriptionAllocated(alloc).get();
    const std::string prefix = "nezha-deploy graph ";
    if ((name.rfind("head_", 0) == 0 || described.rfind(prefix, 0) == 0) && described != prefix + name)
      throw Error("graph " + precision + "/" + name + " (" + g.file + ") says it is '" + described + "', the manifest uses it as " + name);
  }
}

GraphRunner::GraphRunner(Ort::Session& session, const GraphEntry& entry, std::vector<void*> buffers)
    : session_(session), entry_(entry), buffers_(std::move(buffers)), binding_(session),
      cpu_(Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault)) {
  for (const auto& [dim, range] : entry.dynamic) {
    dim_names_.push_back(dim);
    ranges_.push_back(range);
  }
  bound_dims_.assign(dim_names_.size(), -1);
  const std::size_t tensors = entry.inputs.size() + entry.outputs.size();
  values_.resize(tensors);
  shapes_.assign(tensors, std::vector<std::int64_t>());
  for (auto& shape : shapes_) shape.reserve(8);            // rebinding must not allocate on our side
  shape_.reserve(8);
}

// Binds every tensor whose shape differs from its bound one (all on the first call; afterwards only
// those that use a dim that changed, e.g. a head's `parents`), over the same buffers.
void GraphRunner::bind(const std::int64_t* dims) {
  std::size_t b = 0;
  for (const auto* side : {&entry_.inputs, &entry_.outputs})
    for (const TensorSpec& t : *side) {
      shape_.clear();
      std::size_t count = 1;
      for (const Dim& d : t.shape) {
        std::int64_t size = d.size;
        if (!d.name.empty())
          for (std::size_t i = 0; i < dim_names_.size(); ++i)
            if (dim_names_[i] == d.name) size = dims[i];
        shape_.push_back(size);
        count *= std::size_t(size);
      }
      if (values_[b] && shapes_[b] == shape_) {
        ++b;
        continue;
      }
      const ONNXTensorElementDataType type = element_type(t.dtype);
      const std::size_t bytes = count * (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT ? 4 : 8);
      values_[b] = Ort::Value::CreateTensor(cpu_, buffers_[b], bytes, shape_.data(), shape_.size(), type);
      shapes_[b].assign(shape_.begin(), shape_.end());
      if (side == &entry_.inputs) binding_.BindInput(t.name.c_str(), values_[b]);
      else binding_.BindOutput(t.name.c_str(), values_[b]);
      ++b;
    }
  bound_dims_.assign(dims, dims + dim_names_.size());
  ++rebinds_;
}

void GraphRunner::run(const std::int64_t* dims) {
  for (std::size_t i = 0; i < dim_names_.size(); ++i) {
    const auto& range = ranges_[i];
    if (dims[i] < range.first || dims[i] > range.second)
      throw RunError("dim " + dim_names_[i] + " = " + std::to_string(dims[i]) + " is outside the built range [" +
                  std::to_string(range.first) + ", " + std::to_string(range.second) + "]");
  }
  OrtCall in_ort;
  try {
    if (!std::equal(bound_dims_.begin(), bound_dims_.end(), dims)) bind(dims);
    session_.Run(run_options_, binding_);
  } catch (const Ort::Exception& e) {
    throw RunError(std::string("ONNX Runtime failed: ") + e.what());
  }
}

}  // namespace nezha
