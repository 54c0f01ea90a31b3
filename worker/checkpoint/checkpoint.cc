#include "tandem/checkpoint/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "tandem/common/log.h"

namespace tandem::checkpoint {
namespace {

namespace fs = std::filesystem;
constexpr int kFormatVersion = 1;
constexpr const char* kManifestChecksumKey = "manifestSha256";

Status errnoError(StatusCode code, const std::string& what) {
  const int saved = errno;
  return Status(saved == ENOSPC || saved == EDQUOT ? StatusCode::kResourceUnavailable : code,
                what + ": " + std::strerror(saved), __FILE__, __LINE__);
}

std::string sha256Hex(const void* data, size_t size) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(data, size, digest, &length, EVP_sha256(), nullptr);
  static const char* kHex = "0123456789abcdef";
  std::string text;
  for (unsigned int i = 0; i < length; ++i) {
    text += kHex[digest[i] >> 4];
    text += kHex[digest[i] & 15];
  }
  return text;
}

// Writes a whole file and fsyncs it before closing, so a rename after it publishes complete data.
Status writeFileDurably(const std::string& path, const std::vector<std::pair<const void*, size_t>>& pieces) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errnoError(StatusCode::kPermissionDenied, "cannot create " + path);
  for (const auto& [data, size] : pieces) {
    const char* cursor = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      const ssize_t written = ::write(fd, cursor, left);
      if (written < 0) {
        if (errno == EINTR) continue;
        Status status = errnoError(StatusCode::kInternal, "cannot write " + path);
        ::close(fd);
        return status;
      }
      cursor += written;
      left -= static_cast<size_t>(written);
    }
  }
  if (::fsync(fd) != 0) {
    Status status = errnoError(StatusCode::kInternal, "cannot fsync " + path);
    ::close(fd);
    return status;
  }
  if (::close(fd) != 0) return errnoError(StatusCode::kInternal, "cannot close " + path);
  return Status::Ok();
}

Status fsyncDirectory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errnoError(StatusCode::kInternal, "cannot open directory " + path);
  const int result = ::fsync(fd);
  ::close(fd);
  if (result != 0) return errnoError(StatusCode::kInternal, "cannot fsync directory " + path);
  return Status::Ok();
}

StatusOr<std::string> readWholeFile(const std::string& path) {
  FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return errnoError(StatusCode::kNotFound, "cannot open " + path);
  std::string content;
  char buffer[1 << 16];
  size_t read;
  while ((read = std::fread(buffer, 1, sizeof(buffer), file)) > 0) content.append(buffer, read);
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return TANDEM_ERROR(StatusCode::kDataLoss, "cannot read " + path);
  return content;
}

std::string shardName(int stage) { return "stage-" + std::to_string(stage) + ".bin"; }

// Test-only fault injection: a pause between writing the shard and publishing the checkpoint, so a
// test can kill the writer mid-checkpoint deterministically; TANDEM_FAULT_CHECKPOINT_DELAY_STAGE limits
// it to one pipeline stage's writer (one slow disk).
void faultInjectionPause(int stage) {
  const char* delay = std::getenv("TANDEM_FAULT_CHECKPOINT_DELAY_MS");
  const char* onlyStage = std::getenv("TANDEM_FAULT_CHECKPOINT_DELAY_STAGE");
  if (delay != nullptr && (onlyStage == nullptr || std::atoi(onlyStage) == stage))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(delay)));
}

// Test-only fault injection: TANDEM_FAULT_CHECKPOINT_READ_DELAY_MS slows every read of a checkpoint
// (storage slower than a collective timeout, as a network volume holding a large shard is).
void faultInjectionReadDelay() {
  if (const char* delay = std::getenv("TANDEM_FAULT_CHECKPOINT_READ_DELAY_MS"); delay != nullptr)
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(delay)));
}

// Test-only fault injection: the writer of stage TANDEM_FAULT_CHECKPOINT_FAIL_STAGE fails every checkpoint
// from step TANDEM_FAULT_CHECKPOINT_FAIL_FROM_STEP on, after its shard is written (a disk that filled up).
Status faultInjectionFailure(int stage, int64_t step) {
  const char* failStage = std::getenv("TANDEM_FAULT_CHECKPOINT_FAIL_STAGE");
  const char* fromStep = std::getenv("TANDEM_FAULT_CHECKPOINT_FAIL_FROM_STEP");
  if (failStage != nullptr && fromStep != nullptr && std::atoi(failStage) == stage && step >= std::atoll(fromStep))
    return TANDEM_ERROR(StatusCode::kResourceUnavailable, "injected failure (TANDEM_FAULT_CHECKPOINT_FAIL_STAGE)");
  return Status::Ok();
}

}  // namespace

std::string stepDirectoryName(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%08lld", static_cast<long long>(step));
  return name;
}

std::chrono::milliseconds resumeExchangeDeadline(std::chrono::milliseconds collectiveTimeout, double largestShardBytes,
                                                 int64_t kept) {
  constexpr double kSlowestBytesPerSecond = 20e6;
  constexpr double kLongestMilliseconds = 7 * 24 * 3600e3;
  const double waits = static_cast<double>(std::clamp<int64_t>(kept, 1, 7) + 2);  // the reads and the transfer
  const double milliseconds =
      waits * (static_cast<double>(collectiveTimeout.count()) + 1e3 * std::max(0.0, largestShardBytes) / kSlowestBytesPerSecond);
  return std::max(collectiveTimeout,
                  std::chrono::milliseconds(static_cast<int64_t>(std::ceil(std::min(milliseconds, kLongestMilliseconds)))));
}

CheckpointStore::CheckpointStore(std::string root, int64_t keep) : root_(std::move(root)), keep_(std::max<int64_t>(1, keep)) {}

StatusOr<int64_t> CheckpointStore::write(const CheckpointState& state, int64_t alsoKeep) {
  std::error_code error;
  fs::create_directories(root_, error);
  if (error) return TANDEM_ERROR(StatusCode::kPermissionDenied, "cannot create checkpoint directory " + root_ + ": " + error.message());
  const std::string finalDirectory = root_ + "/" + stepDirectoryName(state.step);
  const std::string temporary = root_ + "/.tmp-" + stepDirectoryName(state.step) + "-" + std::to_string(::getpid());
  // A writer killed mid-checkpoint leaves its temporary directory behind; there is one writer per
  // store, so every temporary directory found now is such debris.
  for (const auto& entry : fs::directory_iterator(root_, error))
    if (entry.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(entry.path(), error);
  if (::mkdir(temporary.c_str(), 0755) != 0) return errnoError(StatusCode::kPermissionDenied, "cannot create " + temporary);

  auto attempt = [&]() -> StatusOr<int64_t> {
    const size_t parameterBytes = state.parameters.size() * sizeof(float);
    const size_t optimizerBytes = state.optimizerState.size() * sizeof(float);
    // One pass for the checksum over both sections, as laid out in the file.
    EVP_MD_CTX* context = EVP_MD_CTX_new();
    EVP_DigestInit_ex(context, EVP_sha256(), nullptr);
    EVP_DigestUpdate(context, state.parameters.data(), parameterBytes);
    EVP_DigestUpdate(context, state.optimizerState.data(), optimizerBytes);
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int length = 0;
    EVP_DigestFinal_ex(context, digest, &length);
    EVP_MD_CTX_free(context);
    std::string checksum;
    static const char* kHex = "0123456789abcdef";
    for (unsigned int i = 0; i < length; ++i) (checksum += kHex[digest[i] >> 4]) += kHex[digest[i] & 15];

    TANDEM_RETURN_IF_ERROR(writeFileDurably(temporary + "/" + shardName(state.stage),
                                            {{state.parameters.data(), parameterBytes},
                                             {state.optimizerState.data(), optimizerBytes}}));
    faultInjectionPause(state.stage);
    TANDEM_RETURN_IF_ERROR(faultInjectionFailure(state.stage, state.step));
    nlohmann::json manifest = {
        {"formatVersion", kFormatVersion},
        {"job", state.job},
        {"step", state.step},
        {"optimizerSteps", state.optimizerSteps},
        {"modelDescription", state.modelDescription},
        {"trainingConfig", state.trainingConfig},
        {"seed", state.seed},
        {"dataPosition", {{"nextStep", state.step + 1}}},
        {"shards",
         {{{"stage", state.stage},
           {"file", shardName(state.stage)},
           {"bytes", parameterBytes + optimizerBytes},
           {"sha256", checksum},
           {"parameters", state.parameters.size()},
           {"optimizerState", state.optimizerState.size()}}}},
    };
    // The shard's SHA-256 covers its bytes; this one covers the manifest's own fields (the section counts
    // that split the shard, the step, the model), over their compact dump without this field.
    const std::string fields = manifest.dump();
    manifest[kManifestChecksumKey] = sha256Hex(fields.data(), fields.size());
    const std::string text = manifest.dump(1);
    TANDEM_RETURN_IF_ERROR(writeFileDurably(temporary + "/manifest.json", {{text.data(), text.size()}}));
    TANDEM_RETURN_IF_ERROR(fsyncDirectory(temporary));
    // A checkpoint of the same step may exist (written before a restart): replace it whole.
    fs::remove_all(finalDirectory, error);
    if (::rename(temporary.c_str(), finalDirectory.c_str()) != 0)
      return errnoError(StatusCode::kInternal, "cannot rename " + temporary + " to " + finalDirectory);
    TANDEM_RETURN_IF_ERROR(fsyncDirectory(root_));
    const std::string latestTemporary = root_ + "/.latest.tmp";
    const std::string latestText = stepDirectoryName(state.step) + "\n";
    TANDEM_RETURN_IF_ERROR(writeFileDurably(latestTemporary, {{latestText.data(), latestText.size()}}));
    if (::rename(latestTemporary.c_str(), (root_ + "/latest").c_str()) != 0)
      return errnoError(StatusCode::kInternal, "cannot update " + root_ + "/latest");
    TANDEM_RETURN_IF_ERROR(fsyncDirectory(root_));
    return static_cast<int64_t>(parameterBytes + optimizerBytes + text.size());
  };
  auto written = attempt();
  if (!written.ok()) {
    fs::remove_all(temporary, error);
    return written.status().withContext("checkpoint " + stepDirectoryName(state.step) + " not written");
  }
  Status pruned = removeOld(state.step, alsoKeep);
  if (!pruned.ok()) return pruned;
  return written;
}

std::vector<int64_t> CheckpointStore::listSteps() const {
  std::vector<int64_t> steps;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(root_, error)) {
    const std::string name = entry.path().filename().string();
    long long step = 0;
    char tail = 0;
    if (entry.is_directory() && std::sscanf(name.c_str(), "step-%lld%c", &step, &tail) == 1 &&
        name == stepDirectoryName(step))
      steps.push_back(step);
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

Status CheckpointStore::removeOld(int64_t written, int64_t alsoKeep) const {
  // Retention counts back from the checkpoint just written. A newer step can only be one that resume
  // skipped as unverifiable: it neither counts against `keep` nor is deleted here (writing that step
  // again replaces it), so it cannot push the fresh checkpoints out.
  std::vector<int64_t> steps;
  for (int64_t step : listSteps())
    if (step <= written) steps.push_back(step);
  std::error_code error;
  for (size_t i = static_cast<size_t>(keep_); i < steps.size(); ++i) {
    if (steps[i] == alsoKeep) continue;
    fs::remove_all(root_ + "/" + stepDirectoryName(steps[i]), error);
    if (error) return TANDEM_ERROR(StatusCode::kInternal, "cannot delete old checkpoint " + stepDirectoryName(steps[i]) + ": " + error.message());
  }
  return Status::Ok();
}

StatusOr<CheckpointState> CheckpointStore::read(int64_t step, int stage) const {
  faultInjectionReadDelay();
  const std::string directory = root_ + "/" + stepDirectoryName(step);
  TANDEM_ASSIGN_OR_RETURN(std::string manifestText, readWholeFile(directory + "/manifest.json"));
  nlohmann::json manifest = nlohmann::json::parse(manifestText, nullptr, false);
  if (manifest.is_discarded() || !manifest.is_object())
    return TANDEM_ERROR(StatusCode::kDataLoss, directory + "/manifest.json: not valid JSON (truncated?)");
  try {
    if (manifest.at("formatVersion").get<int>() != kFormatVersion)
      return TANDEM_ERROR(StatusCode::kDataLoss, directory + "/manifest.json: unknown format version");
    // Checkpoints written before 2026-11-27 lack it and rely on the shard's checksum and the size checks.
    if (manifest.contains(kManifestChecksumKey)) {
      const std::string recorded = manifest.at(kManifestChecksumKey).get<std::string>();
      nlohmann::json fields = manifest;
      fields.erase(kManifestChecksumKey);
      const std::string text = fields.dump();
      if (sha256Hex(text.data(), text.size()) != recorded)
        return TANDEM_ERROR(StatusCode::kDataLoss,
                            directory + "/manifest.json: its fields do not match their SHA-256 (corrupt)");
    }
    CheckpointState state;
    state.step = manifest.at("step").get<int64_t>();
    if (state.step != step)
      return TANDEM_ERROR(StatusCode::kDataLoss, directory + "/manifest.json: says step " + std::to_string(state.step));
    state.optimizerSteps = manifest.at("optimizerSteps").get<int64_t>();
    state.job = manifest.at("job").get<std::string>();
    state.modelDescription = manifest.at("modelDescription").get<std::string>();
    state.trainingConfig = manifest.at("trainingConfig").get<std::string>();
    state.seed = manifest.at("seed").get<uint64_t>();
    state.stage = stage;
    const nlohmann::json* shard = nullptr;
    for (const auto& candidate : manifest.at("shards"))
      if (candidate.at("stage").get<int>() == stage) shard = &candidate;
    if (shard == nullptr)
      return TANDEM_ERROR(StatusCode::kDataLoss, directory + "/manifest.json: no shard for stage " + std::to_string(stage));
    const std::string shardPath = directory + "/" + shard->at("file").get<std::string>();
    TANDEM_ASSIGN_OR_RETURN(std::string bytes, readWholeFile(shardPath));
    const size_t expectedBytes = shard->at("bytes").get<size_t>();
    if (bytes.size() != expectedBytes)
      return TANDEM_ERROR(StatusCode::kDataLoss, shardPath + ": " + std::to_string(bytes.size()) + " bytes, the manifest says " +
                                                     std::to_string(expectedBytes) + " (truncated?)");
    if (sha256Hex(bytes.data(), bytes.size()) != shard->at("sha256").get<std::string>())
      return TANDEM_ERROR(StatusCode::kDataLoss, shardPath + ": SHA-256 does not match the manifest (corrupt)");
    const size_t parameters = shard->at("parameters").get<size_t>();
    const size_t optimizer = shard->at("optimizerState").get<size_t>();
    // Compared without multiplying: a damaged count must not wrap around into a match (or a huge resize).
    const size_t floats = bytes.size() / sizeof(float);
    if (bytes.size() % sizeof(float) != 0 || parameters > floats || optimizer != floats - parameters)
      return TANDEM_ERROR(StatusCode::kDataLoss, shardPath + ": section sizes do not add up");
    state.parameters.resize(parameters);
    state.optimizerState.resize(optimizer);
    std::memcpy(state.parameters.data(), bytes.data(), parameters * sizeof(float));
    std::memcpy(state.optimizerState.data(), bytes.data() + parameters * sizeof(float), optimizer * sizeof(float));
    return state;
  } catch (const nlohmann::json::exception& error) {
    return TANDEM_ERROR(StatusCode::kDataLoss, directory + "/manifest.json: " + error.what());
  }
}

StatusOr<std::string> CheckpointStore::readModelDescription(int64_t step) const {
  const std::string path = root_ + "/" + stepDirectoryName(step) + "/manifest.json";
  TANDEM_ASSIGN_OR_RETURN(std::string text, readWholeFile(path));
  const nlohmann::json manifest = nlohmann::json::parse(text, nullptr, false);
  if (!manifest.is_object() || !manifest.contains("modelDescription") || !manifest["modelDescription"].is_string())
    return TANDEM_ERROR(StatusCode::kDataLoss, path + ": no model description (truncated?)");
  return manifest["modelDescription"].get<std::string>();
}

StatusOr<std::optional<CheckpointState>> CheckpointStore::readMatching(
    int64_t step, int stage, const std::string& modelDescription, const std::function<void(const std::string&)>& warn) const {
  auto state = read(step, stage);
  if (!state.ok()) {
    if (warn) warn("skipping checkpoint " + stepDirectoryName(step) + ": " + state.status().message());
    return std::optional<CheckpointState>();
  }
  if (state->modelDescription != modelDescription)
    return TANDEM_ERROR(StatusCode::kFailedPrecondition,
                        "checkpoint " + root_ + "/" + stepDirectoryName(step) + " holds model \"" + state->modelDescription +
                            "\" but this job trains \"" + modelDescription +
                            "\": refusing to resume (use another checkpoint.dir or job name to start over)");
  return std::optional<CheckpointState>(std::move(state).value());
}

StatusOr<std::optional<CheckpointState>> CheckpointStore::loadNewestValid(
    const std::string& modelDescription, int stage, const std::function<void(const std::string&)>& warn) const {
  for (int64_t step : listSteps()) {
    TANDEM_ASSIGN_OR_RETURN(std::optional<CheckpointState> state, readMatching(step, stage, modelDescription, warn));
    if (state) return state;
  }
  return std::optional<CheckpointState>();
}

namespace {
std::string secondsText(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f s", seconds);
  return text;
}
}  // namespace

AsyncCheckpointer::AsyncCheckpointer(CheckpointStore store, std::chrono::milliseconds writeTimeout,
                                     int64_t lastDurableStep, std::function<void(const Result&)> onWritten)
    : shared_(std::make_shared<Shared>(std::move(store))),
      // Bounded so that writeStart + writeTimeout cannot overflow the clock.
      writeTimeout_(std::clamp(writeTimeout, std::chrono::milliseconds(1), kForever)) {
  shared_->lastDurableStep = lastDurableStep;
  shared_->onWritten = std::move(onWritten);
  writer_ = std::thread([shared = shared_] { run(shared); });
}

AsyncCheckpointer::~AsyncCheckpointer() {
  std::unique_lock<std::mutex> lock(shared_->mutex);
  shared_->stopping = true;
  shared_->changed.notify_all();
  const Clock::time_point limit = std::min(shutdownDeadline_, Clock::now() + shutdownPatience_);
  const Status finished = waitIdle(lock, limit, "shutdown");
  if (finished.ok()) {
    lock.unlock();
    writer_.join();
    return;
  }
  log::warning() << finished.message() << "; leaving it unfinished";
  // Hung or out of time: the thread keeps the shared state alive and exits when (if) its write returns.
  // Wait out a report already running, which uses the owner's objects, and stop any later one.
  shared_->abandoned = true;
  shared_->changed.wait(lock, [this] { return !shared_->reporting; });
  lock.unlock();
  writer_.detach();
}

void AsyncCheckpointer::limitShutdown(std::chrono::milliseconds patience) {
  shutdownPatience_ = std::clamp(patience, std::chrono::milliseconds(0), kForever);
}

void AsyncCheckpointer::limitShutdown(Clock::time_point deadline) { shutdownDeadline_ = deadline; }

bool AsyncCheckpointer::hung() const {
  return shared_->writingStep && Clock::now() - shared_->writeStart >= writeTimeout_;
}

std::string AsyncCheckpointer::inFlightDescription() const {
  if (!shared_->writingStep) {
    const int64_t queued = shared_->pending ? shared_->pending->step : 0;
    return "checkpoint " + stepDirectoryName(queued) + " is queued for " + shared_->store.root();
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - shared_->writeStart).count();
  return "checkpoint " + stepDirectoryName(*shared_->writingStep) + " is being written to " + shared_->store.root() +
         " (for " + secondsText(seconds) + ")";
}

std::string AsyncCheckpointer::lastDurableDescription() const {
  return "; the last durable checkpoint is " +
         (shared_->lastDurableStep > 0 ? stepDirectoryName(shared_->lastDurableStep) : std::string("none"));
}

Status AsyncCheckpointer::hungError() const {
  return TANDEM_ERROR(StatusCode::kResourceUnavailable, inFlightDescription() + ", longer than the checkpoint timeout (" +
                                                    secondsText(std::chrono::duration<double>(writeTimeout_).count()) +
                                                    "): the storage does not answer" + lastDurableDescription());
}

Status AsyncCheckpointer::waitIdle(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    if (!shared_->writingStep && !shared_->pending) return Status::Ok();
    if (hung()) return hungError();
    if (Clock::now() >= deadline)
      return TANDEM_ERROR(StatusCode::kDeadlineExceeded, inFlightDescription() + ", not durable when " + what +
                                                             " had to go on" + lastDurableDescription());
    // A queued state is picked up at once; a write in flight is waited for until it turns hung.
    Clock::time_point until = deadline;
    if (shared_->writingStep) until = std::min(until, shared_->writeStart + writeTimeout_);
    if (until == Clock::time_point::max())
      shared_->changed.wait(lock);
    else
      shared_->changed.wait_until(lock, until);
  }
}

std::optional<int64_t> AsyncCheckpointer::stepInFlight() {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  if (shared_->writingStep) return shared_->writingStep;
  if (shared_->pending) return shared_->pending->step;
  return std::nullopt;
}

Status AsyncCheckpointer::checkWriter() {
  std::lock_guard<std::mutex> lock(shared_->mutex);
  return hung() ? hungError() : Status::Ok();
}

Status AsyncCheckpointer::submit(CheckpointState state, Clock::time_point deadline, int64_t alsoKeep) {
  std::unique_lock<std::mutex> lock(shared_->mutex);
  TANDEM_RETURN_IF_ERROR(waitIdle(lock, deadline, "the snapshot of " + stepDirectoryName(state.step)));
  shared_->pending = std::move(state);
  shared_->pendingAlsoKeep = alsoKeep;
  shared_->changed.notify_all();
  return Status::Ok();
}

StatusOr<std::optional<AsyncCheckpointer::Result>> AsyncCheckpointer::drain(Clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(shared_->mutex);
  TANDEM_RETURN_IF_ERROR(waitIdle(lock, deadline, "the wait for it"));
  return shared_->lastResult;
}

void AsyncCheckpointer::run(const std::shared_ptr<Shared>& shared) {
  for (;;) {
    CheckpointState state;
    int64_t alsoKeep = 0;
    {
      std::unique_lock<std::mutex> lock(shared->mutex);
      shared->changed.wait(lock, [&] { return shared->stopping || shared->pending.has_value(); });
      if (!shared->pending || shared->abandoned) return;  // stopping with nothing queued, or left behind
      state = std::move(*shared->pending);
      alsoKeep = shared->pendingAlsoKeep;
      shared->pending.reset();
      shared->writingStep = state.step;
      shared->writeStart = Clock::now();
    }
    shared->changed.notify_all();  // waiters now wait for this write, until it turns hung
    Result result;
    result.step = state.step;
    auto written = shared->store.write(state, alsoKeep);
    result.seconds = std::chrono::duration<double>(Clock::now() - shared->writeStart).count();
    result.status = written.status();
    result.bytes = written.ok() ? *written : 0;
    {
      std::lock_guard<std::mutex> lock(shared->mutex);
      if (shared->abandoned) return;
      shared->reporting = true;
      // Only this thread changes it.
      result.lastDurableStep = result.status.ok() ? result.step : shared->lastDurableStep;
    }
    if (shared->onWritten) shared->onWritten(result);
    {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->reporting = false;
      shared->writingStep.reset();
      shared->lastDurableStep = result.lastDurableStep;
      shared->lastResult = result;
    }
    shared->changed.notify_all();
  }
}

}  // namespace tandem::checkpoint
