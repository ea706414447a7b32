// Forwarding header: cub::BlockScan on the CPU (tests/cudacpu shim).
#pragma once
#include "cudacpu/cub.h"
