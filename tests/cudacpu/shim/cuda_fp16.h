// Forwarding header: __half on the CPU (tests/cudacpu shim).
#pragma once
#include "cudacpu/intrinsics.h"
#include "cudacpu/half.h"
