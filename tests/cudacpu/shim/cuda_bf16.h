// Forwarding header: __nv_bfloat16 on the CPU (tests/cudacpu shim).
#pragma once
#include "cudacpu/intrinsics.h"
#include "cudacpu/half.h"
