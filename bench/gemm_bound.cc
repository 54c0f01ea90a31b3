// gemm_bound: the physical limit of the CPU engine for an MLP step: only the step's GEMMs (forward,
// weight gradients, input gradients except the first layer's), in a plain loop through OpenBLAS.
//   gemm_bound [--threads N] [--batch B] [--layers 784,256,128,10] [--seconds S]
// Prints one JSON line: {"threads":..,"core":..,"batch":..,"gflops":..,"samplesPerSecond":..} and how
// steady the CPU was: step times' 10th, 50th and 90th percentiles, and the slowest and fastest quarter
// second's GFLOP/s. Several copies on cores of their own (taskset) show whether a machine's cores keep
// an even pace side by side, as a pipeline's stages need.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "tandem/kernels/gemm.h"

using tandem::kernels::Transpose;

int main(int argc, char** argv) {
  tandem::kernels::restartWithBetterGemmCore(argv);  // the kernels tandem-worker gets (OPENBLAS_CORETYPE overrides)
  int threads = 1;
  int64_t batch = 256;
  double seconds = 3.0;
  std::vector<int64_t> widths{784, 256, 128, 10};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--threads") threads = std::atoi(argv[i + 1]);
    else if (flag == "--batch") batch = std::atoll(argv[i + 1]);
    else if (flag == "--seconds") seconds = std::atof(argv[i + 1]);
    else if (flag == "--layers") {
      widths.clear();
      std::stringstream list(argv[i + 1]);
      std::string item;
      while (std::getline(list, item, ',')) widths.push_back(std::atoll(item.c_str()));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  tandem::kernels::setGemmThreads(threads);
  const size_t layers = widths.size() - 1;
  std::vector<std::vector<float>> weights(layers), weightGrads(layers), activations(layers + 1), grads(layers + 1);
  for (size_t l = 0; l < layers; ++l) {
    weights[l].assign(widths[l] * widths[l + 1], 0.01f);
    weightGrads[l].assign(widths[l] * widths[l + 1], 0.0f);
  }
  for (size_t l = 0; l <= layers; ++l) {
    activations[l].assign(batch * widths[l], 0.5f);
    grads[l].assign(batch * widths[l], 0.1f);
  }
  double flopsPerStep = 0;
  for (size_t l = 0; l < layers; ++l) {
    const double macs = static_cast<double>(batch) * widths[l] * widths[l + 1];
    flopsPerStep += 2 * macs * (l == 0 ? 2 : 3);  // forward, dW, and dX except for the first layer
  }
  auto step = [&] {
    for (size_t l = 0; l < layers; ++l)  // Y (batch, out) = X (batch, in) W^T
      tandem::kernels::gemm(Transpose::kNo, Transpose::kYes, batch, widths[l + 1], widths[l], 1.0f,
                            activations[l].data(), widths[l], weights[l].data(), widths[l], 0.0f,
                            activations[l + 1].data(), widths[l + 1]);
    for (size_t l = layers; l-- > 0;) {
      tandem::kernels::gemm(Transpose::kYes, Transpose::kNo, widths[l + 1], widths[l], batch, 1.0f,
                            grads[l + 1].data(), widths[l + 1], activations[l].data(), widths[l], 1.0f,
                            weightGrads[l].data(), widths[l]);
      if (l > 0)
        tandem::kernels::gemm(Transpose::kNo, Transpose::kNo, batch, widths[l], widths[l + 1], 1.0f,
                              grads[l + 1].data(), widths[l + 1], weights[l].data(), widths[l], 0.0f,
                              grads[l].data(), widths[l]);
    }
  };
  for (int i = 0; i < 20; ++i) step();  // warm caches and OpenBLAS threads
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  std::vector<double> stepEnds;  // seconds since start
  stepEnds.reserve(1 << 20);      // no reallocation inside the timed loop for short steps
  double elapsed = 0;
  do {
    step();
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    stepEnds.push_back(elapsed);
  } while (elapsed < seconds);
  const int64_t steps = static_cast<int64_t>(stepEnds.size());
  std::vector<double> stepMs;
  for (size_t i = 0; i < stepEnds.size(); ++i) stepMs.push_back(1000 * (stepEnds[i] - (i == 0 ? 0.0 : stepEnds[i - 1])));
  std::sort(stepMs.begin(), stepMs.end());
  auto percentile = [&](double p) { return stepMs[static_cast<size_t>(p * static_cast<double>(stepMs.size() - 1))]; };
  // Steps ending in each whole quarter second.
  constexpr double kWindow = 0.25;
  std::vector<int64_t> perWindow(static_cast<size_t>(elapsed / kWindow), 0);
  for (const double end : stepEnds)
    if (static_cast<size_t>(end / kWindow) < perWindow.size()) ++perWindow[static_cast<size_t>(end / kWindow)];
  const auto [fewest, most] = perWindow.empty() ? std::pair<int64_t, int64_t>{0, 0}
                                                : std::pair<int64_t, int64_t>{*std::min_element(perWindow.begin(), perWindow.end()),
                                                                              *std::max_element(perWindow.begin(), perWindow.end())};
  std::printf("{\"threads\":%d,\"core\":\"%s\",\"batch\":%lld,\"stepsTimed\":%lld,\"gflops\":%.2f,\"samplesPerSecond\":%.0f,"
              "\"stepMsP10\":%.3f,\"stepMsP50\":%.3f,\"stepMsP90\":%.3f,\"windowGflopsMin\":%.2f,\"windowGflopsMax\":%.2f}\n",
              threads, tandem::kernels::gemmCore().c_str(), static_cast<long long>(batch), static_cast<long long>(steps),
              flopsPerStep * static_cast<double>(steps) / elapsed / 1e9, static_cast<double>(batch * steps) / elapsed, percentile(0.1),
              percentile(0.5), percentile(0.9), flopsPerStep * static_cast<double>(fewest) / kWindow / 1e9,
              flopsPerStep * static_cast<double>(most) / kWindow / 1e9);
  return 0;
}
