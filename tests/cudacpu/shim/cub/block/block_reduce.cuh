// Forwarding header: cub::BlockReduce on the CPU (tests/cudacpu shim).
#pragma once
#include "cudacpu/cub.h"
