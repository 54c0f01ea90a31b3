// tandem-operator: placeholder until the operator issue lands. It refuses to run rather than pretend.
#include <cstdio>

int main() {
  std::fprintf(stderr, "tandem-operator is not implemented yet (see the operator issue)\n");
  return 1;
}
