// The launcher's port choice (launch::freePort): ports a worker binds moments later must not be ones an
// outgoing connection can be handed in between. And the restart accounting's steps lost.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <set>

#include <gtest/gtest.h>

#include "tandem/launch/local_job.h"

namespace tandem::launch {
namespace {

// Listens on `port` on every IPv4 address; -1 when it cannot.
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

// Listens on `port` on IPv6 loopback only (a store bound to [::1]); -1 when this machine has no IPv6.
int listenOnIpv6LoopbackOnly(int port) {
  const int fd = socket(AF_INET6, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  const int yes = 1;
  setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &yes, sizeof(yes));
  sockaddr_in6 address{};
  address.sin6_family = AF_INET6;
  address.sin6_addr = in6addr_loopback;
  address.sin6_port = htons(static_cast<uint16_t>(port));
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

TEST(FreePort, APortAListenerHoldsOnEitherFamilyIsNotFree) {
  const int port = freePort();
  ASSERT_TRUE(portFree(port));
  const int ipv4 = listenOn(port);
  ASSERT_GE(ipv4, 0);
  EXPECT_FALSE(portFree(port)) << "an IPv4 listener on " << port;
  close(ipv4);
  EXPECT_TRUE(portFree(port));
  const int ipv6 = listenOnIpv6LoopbackOnly(port);
  if (ipv6 >= 0) {  // (a machine without IPv6 has no such listener to miss)
    EXPECT_FALSE(portFree(port)) << "an IPv6-only listener on [::1]:" << port;
    close(ipv6);
  }
}

// Steps lost over restarts: only steps trained again count.
TEST(StepsLostCounter, CountsOnlyStepsTrainedAgain) {
  StepsLostCounter counter;
  counter.addGeneration(0, 57);   // fresh start, killed after step 57
  counter.addGeneration(0, 0);    // failed before training (its port was taken): nothing, and hides nothing
  counter.addGeneration(40, 40);  // resumed from step 40, failed before a step: nothing yet
  EXPECT_EQ(counter.stepsLost(), 0);
  counter.addGeneration(40, 100);  // resumed from 40 and trained on: 41..57 again
  EXPECT_EQ(counter.stepsLost(), 17);
  counter.addGeneration(100, 150);  // resumed from a stop checkpoint at its last step: nothing again
  EXPECT_EQ(counter.stepsLost(), 17);
  counter.addGeneration(0, 30);  // checkpoints gone: a fresh start trains 1..30 again
  EXPECT_EQ(counter.stepsLost(), 47);
}

}  // namespace
}  // namespace tandem::launch
