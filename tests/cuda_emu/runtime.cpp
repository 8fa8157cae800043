#include "runtime.h"
#include <ATen/ATen.h>

EmuIdx threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {
struct Fiber {
  ucontext_t ctx;
  unsigned tx, ty;
  int state;  // 0 runnable, 1 warp wait, 2 block wait, 3 done
  unsigned wait_gen;
};
std::vector<Fiber> fibers;
std::vector<std::vector<char>> stacks;
std::vector<float> dyn;
ucontext_t sched;
int cur = -1;
std::function<void()> body;
struct Bar { int arrived = 0; unsigned gen = 0; };
std::vector<Bar> wbar;
Bar bbar;
std::vector<int> warp_alive;
int block_alive = 0;
bool someone_exited = false;
std::vector<float> shfl;
std::string error;

void fail(const std::string& m) { if (error.empty()) error = m; }

void entry() {
  try {
    body();
  } catch (const std::exception& e) {
    fail(std::string("exception in kernel: ") + e.what());
  }
  Fiber& f = fibers[cur];
  f.state = 3;
  swapcontext(&f.ctx, &sched);
}
int nthreads() { return blockDim.x * blockDim.y * blockDim.z; }
int lin(const Fiber& f) { return f.ty * blockDim.x + f.tx; }
void yield_() { swapcontext(&fibers[cur].ctx, &sched); }
}  // namespace

float* emu_dynsmem() { return dyn.data(); }

void __syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) fail("partial __syncwarp mask");
  Fiber& f = fibers[cur];
  int w = lin(f) / 32;
  int lanes_in_warp = std::min(32, nthreads() - w * 32);
  if (lanes_in_warp != 32) fail("__syncwarp/shfl with full mask in a partial warp");
  if (warp_alive[w] != 32) fail("__syncwarp/shfl with full mask after lanes of the warp exited");
  Bar& b = wbar[w];
  unsigned g = b.gen;
  if (++b.arrived == warp_alive[w]) { b.arrived = 0; b.gen++; return; }
  f.state = 1; f.wait_gen = g;
  yield_();
}

void __syncthreads() {
  Fiber& f = fibers[cur];
  if (someone_exited) fail("__syncthreads after some threads of the block exited (divergent barrier)");
  unsigned g = bbar.gen;
  if (++bbar.arrived == block_alive) { bbar.arrived = 0; bbar.gen++; return; }
  f.state = 2; f.wait_gen = g;
  yield_();
}

float __shfl_xor_sync(unsigned mask, float v, int o) {
  Fiber& f = fibers[cur];
  int l = lin(f), w = l / 32, lane = l % 32;
  shfl[l] = v;
  __syncwarp(mask);
  float r = shfl[w * 32 + (lane ^ o)];
  __syncwarp(mask);
  return r;
}

void emu_run(dim3 grid, dim3 block, size_t smem, std::function<void()> b) {
  const long long nt = (long long)block.x * block.y * block.z;
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.z >= 1, "EMU: invalid configuration: empty grid ", grid.x, "x", grid.y, "x", grid.z);
  TORCH_CHECK(grid.x <= 2147483647u && grid.y <= 65535 && grid.z <= 65535, "EMU: grid too large");
  TORCH_CHECK(nt >= 1 && nt <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64, "EMU: bad block ", nt);
  TORCH_CHECK(smem <= 48 * 1024, "EMU: dynamic shared memory ", smem, " > the default 48 KiB");
  body = std::move(b);
  blockDim = block; gridDim = grid;
  const int n = (int)nt;
  if ((int)stacks.size() < n) { stacks.resize(n); for (auto& s : stacks) if (s.empty()) s.resize(256 * 1024); }
  fibers.assign(n, Fiber{});
  shfl.assign(((n + 31) / 32) * 32, 0.f);
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = {bx, by, bz};
      dyn.assign(smem / sizeof(float) + 1, std::numeric_limits<float>::quiet_NaN());  // garbage: NaN
      int nw = (n + 31) / 32;
      wbar.assign(nw, Bar{});
      warp_alive.assign(nw, 0);
      for (int i = 0; i < n; ++i) warp_alive[i / 32]++;
      bbar = Bar{}; block_alive = n; someone_exited = false;
      for (int i = 0; i < n; ++i) {
        Fiber& f = fibers[i];
        f.tx = i % block.x; f.ty = i / block.x; f.state = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i].data();
        f.ctx.uc_stack.ss_size = stacks[i].size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
      }
      int done = 0;
      while (done < n) {
        bool progress = false;
        for (int i = 0; i < n; ++i) {
          Fiber& f = fibers[i];
          if (f.state == 3) continue;
          if (f.state == 1 && wbar[lin(f) / 32].gen == f.wait_gen) continue;
          if (f.state == 2 && bbar.gen == f.wait_gen) continue;
          f.state = 0;
          cur = i;
          threadIdx = {f.tx, f.ty, 0};
          swapcontext(&sched, &f.ctx);
          progress = true;
          if (f.state == 3) {
            ++done;
            warp_alive[lin(f) / 32]--;
            block_alive--;
            someone_exited = true;
            // a barrier others wait on may now be complete (CUDA: exited threads do not count)
            if (bbar.arrived > 0 && bbar.arrived == block_alive) { bbar.arrived = 0; bbar.gen++; }
          }
          if (!error.empty()) break;
        }
        if (!error.empty()) break;
        if (!progress) { fail("deadlock: threads wait at a barrier that can never complete"); break; }
      }
      if (!error.empty()) {
        std::string e = error; error.clear();
        TORCH_CHECK(false, "EMU: block (", bx, ",", by, "): ", e);
      }
    }
}
void emu_check_launch() {}
