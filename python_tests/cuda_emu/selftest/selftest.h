// Launchers of the emulator's self-test kernels (selftest.cu): each runs one small kernel and
// returns what it computed; a kernel that breaks a CUDA rule makes the launch throw.
#pragma once

#include <string>
#include <vector>

namespace emu_selftest {

// Warp operations: out[t] for 64 threads of __shfl_sync / _up / _down / _xor (with widths),
// __ballot_sync, __any_sync, __all_sync; the host recomputes them from the CUDA guide.
std::vector<unsigned> warp_ops();
// atomicAdd of 1.0f by every thread of `blocks` blocks of 256 into one float.
float atomic_count(int blocks);
// A warp-synchronous shared-memory sum with __syncwarp between the steps, and (when
// `unsynced`) the same sum written as if lanes ran in lockstep: {without, with} (NaN: not run).
std::vector<float> lockstep_sum(bool unsynced);

// Kernels that break a rule; each launch must throw an error naming it.
void barrier_at_two_lines();
void barrier_after_exit();
void shuffle_lane_outside_mask();
void shuffle_by_half_a_warp();
void cp_async_past_shared_end();
void cp_async_never_waited();
void static_shared_overflow();

}  // namespace emu_selftest
