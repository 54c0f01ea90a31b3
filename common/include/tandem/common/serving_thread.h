// Runs a bound httplib::Server's listen loop on a thread of its own and ends it whenever asked. httplib's
// stop() does nothing until the thread is inside listen, so a stop that comes first (a worker that
// finished before its server thread got a CPU, a SIGTERM right after start) would otherwise leave the
// thread listening and its join waiting forever: stop() repeats until the loop has returned.
// Header-only: for the targets that link cpp-httplib.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace tandem {

class ServingThread {
 public:
  // `server` must be bound (bind_to_port / bind_to_any_port) and outlive this object.
  explicit ServingThread(httplib::Server& server)
      : server_(server), thread_([this] {
          server_.listen_after_bind();
          serving_ = false;
        }) {}
  ~ServingThread() { stop(); }
  ServingThread(const ServingThread&) = delete;
  ServingThread& operator=(const ServingThread&) = delete;

  void stop() {
    while (serving_) {
      server_.stop();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  httplib::Server& server_;
  std::atomic<bool> serving_{true};  // until listen_after_bind returns; declared before the thread
  std::thread thread_;
};

}  // namespace tandem
