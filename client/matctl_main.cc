// matctl: see client/matctl.h.
#include <iostream>

#include "client/matctl.h"

int main(int argc, char** argv) {
  return mat::client::RunMatctl(argc, argv, std::cout, std::cerr,
                                mat::client::DetectStdoutTerminal());
}
