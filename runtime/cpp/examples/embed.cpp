// Embedding the NEZHA runtime in a C++ service (built by CMake as nezha_embed_example; shown in README).
#include <cstdio>
#include <nezha/recommender.h>

int main(int argc, char** argv) {
  nezha::Options options;
  options.precision = "fp32";                 // or "int8-cpu"; "" = the artifact's first
  options.intra_op_threads = 1;
  try {
    // Checks the manifest, every file's sha256, the tables; opens the ONNX Runtime sessions once.
    auto rec = nezha::Recommender::load(argc > 1 ? argv[1] : "artifacts/nezha", options);
    // Thread-safe: call recommend() from any number of threads; each gets its own bound buffers.
    auto results = rec->recommend({{12, 55, 102}, {7}}, /*k=*/10, /*beam=*/20);
    for (const auto& item : results[0]) std::printf("item %lld score %.4f\n", (long long)item.item, item.score);
  } catch (const nezha::Error& e) {           // bad artifact or request: the message says why
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
