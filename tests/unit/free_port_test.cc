// The launcher's port choice (launch::freePort): ports a worker binds moments later must not be ones an
// outgoing connection can be handed in between.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <set>

#include <gtest/gtest.h>

#include "tandem/launch/local_job.h"

namespace tandem::launch {
namespace {

// Listens on `port` on every address; -1 when it cannot.
int listenOn(int port) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_ANY);
  address.sin_port = htons(static_cast<uint16_t>(port));
  if (bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 || listen(fd, 1) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

TEST(FreePort, PortsComeFromBelowTheEphemeralRangeAndAreNeverHandedOutTwice) {
  const EphemeralPortRange range = ephemeralPortRange();
  ASSERT_GT(range.low, 11000) << "this test needs room below the ephemeral range";
  std::set<int> ports;
  for (int i = 0; i < 300; ++i) {
    const int port = freePort();
    EXPECT_GE(port, 10000);
    EXPECT_LT(port, range.low);
    EXPECT_TRUE(ports.insert(port).second) << "port " << port << " handed out twice";
  }
}

TEST(FreePort, TheWorkerCanListenOnThePortItIsGiven) {
  for (int i = 0; i < 20; ++i) {
    const int port = freePort();
    const int fd = listenOn(port);
    EXPECT_GE(fd, 0) << "port " << port;
    if (fd >= 0) close(fd);
  }
}

TEST(FreePort, ReadsTheKernelsRange) {
  const EphemeralPortRange range = ephemeralPortRange();
  EXPECT_GT(range.low, 0);
  EXPECT_LE(range.low, range.high);
  EXPECT_LE(range.high, 65535);
}

}  // namespace
}  // namespace tandem::launch
