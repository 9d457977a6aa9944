// Translation unit that carries the shared LibTorch precompiled header.
#include <torch/torch.h>
