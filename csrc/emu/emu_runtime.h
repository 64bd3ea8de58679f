// The emulated CUDA runtime's settings, chosen by the tests (archext/testing.py).
#pragma once

#include <cstdint>

namespace archext::emu {

// The order in which a block's threads run between barriers: thread 0 first (forward), last
// first (reverse), shuffled each round (random, seeded), or one warp (a different one in each
// block) run as far as it can before the others (warp_ahead: exposes a missing barrier).
enum class Schedule { kForward, kReverse, kRandom, kWarpAhead };

struct Settings {
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  // Few multiprocessors, so that the grid-stride loops sized by it take more than one turn.
  int sm_count = 2;
};

Settings& settings();

}  // namespace archext::emu
