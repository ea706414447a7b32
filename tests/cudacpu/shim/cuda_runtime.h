// Forwarding header: CUDA runtime names on the CPU (tests/cudacpu shim).
#pragma once
#include "cudacpu/intrinsics.h"
