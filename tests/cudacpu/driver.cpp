// Runs one call of a CUDA kernel's Launch* function on the CPU, under the shim.
//
//   driver CASE OUT    reads a case written by cudacpu_harness.py, writes the outputs
//   driver --shared    prints the bytes of __shared__ memory the shim poisons
//
// Every buffer has exactly the size the call may touch, so an out-of-bounds
// access lands outside it (AddressSanitizer reports it), and outputs start as a
// sentinel pattern, so an output the kernel never wrote cannot pass.
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "kernels/mixture.cuh"
#include "kernels/sample.cuh"
#include "kernels/sample_split.cuh"

namespace memdec_fast {
namespace {

enum Kernel : int64_t { kJoint = 0, kTarget = 1, kSample = 2, kSampleV2 = 3 };
enum Dtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
constexpr unsigned char kSentinel = 0x5a;

struct Reader {
  FILE* f;
  template <typename T>
  T Get() {
    T v;
    if (std::fread(&v, sizeof v, 1, f) != 1) cudacpu::Fail("driver: case file too short");
    return v;
  }
  // Exactly `bytes` bytes on the heap, filled from the file.
  std::unique_ptr<unsigned char[]> Array(size_t bytes) {
    std::unique_ptr<unsigned char[]> p(new unsigned char[bytes]);
    if (bytes > 0 && std::fread(p.get(), 1, bytes, f) != bytes) cudacpu::Fail("driver: case file too short");
    return p;
  }
};

struct Case {
  int64_t kernel, base_dtype, mem_dtype, rows, vocab, base_stride, mem_stride, has_table, captured;
  int64_t max_blocks;  // sample_v2: how many blocks fill the GPU (the glue: 2 x the SM count)
  RowParams scalars;
  PhiloxArgs philox;
  int64_t seed_value, offset_value;  // what the captured pointers point at
  std::unique_ptr<unsigned char[]> base, mem, table, targets;
};

size_t DtypeSize(int64_t d) { return d == kF32 ? 4 : 2; }

// Elements a [rows, vocab] view with this row stride spans.
size_t Span(int64_t rows, int64_t vocab, int64_t stride) { return static_cast<size_t>((rows - 1) * stride + vocab); }

Case ReadCase(FILE* f) {
  Reader r{f};
  char magic[8];
  for (char& c : magic) c = r.Get<char>();
  if (std::memcmp(magic, "MDFCASE2", 8) != 0) cudacpu::Fail("driver: not a case file");
  Case c;
  c.kernel = r.Get<int64_t>();
  c.base_dtype = r.Get<int64_t>();
  c.mem_dtype = r.Get<int64_t>();
  c.rows = r.Get<int64_t>();
  c.vocab = r.Get<int64_t>();
  c.base_stride = r.Get<int64_t>();
  c.mem_stride = r.Get<int64_t>();
  c.has_table = r.Get<int64_t>();
  c.captured = r.Get<int64_t>();
  c.max_blocks = r.Get<int64_t>();
  double p[7];
  for (double& x : p) x = r.Get<double>();
  c.scalars = RowParams{float(p[0]), float(p[1]), float(p[2]), float(p[3]), int(p[4]), float(p[5]), float(p[6])};
  const uint64_t seed = r.Get<uint64_t>(), offset = r.Get<uint64_t>(), intragraph = r.Get<uint64_t>();
  c.base = r.Array(Span(c.rows, c.vocab, c.base_stride) * DtypeSize(c.base_dtype));
  c.mem = r.Array(Span(c.rows, c.vocab, c.mem_stride) * DtypeSize(c.mem_dtype));
  if (c.has_table) c.table = r.Array(c.rows * kNumRowParams * sizeof(float));
  if (c.kernel == kTarget) c.targets = r.Array(c.rows * sizeof(int64_t));
  c.philox = PhiloxArgs{};
  c.philox.captured = c.captured != 0;
  if (c.captured) {  // as torch hands them out under graph capture: device pointers and an intra-graph offset
    c.seed_value = static_cast<int64_t>(seed);
    c.offset_value = static_cast<int64_t>(offset);
    c.philox.offset_intragraph = intragraph;
  } else {
    c.philox.seed = seed;
    c.philox.offset = offset;
  }
  return c;
}

std::unique_ptr<unsigned char[]> Output(size_t bytes) {
  std::unique_ptr<unsigned char[]> p(new unsigned char[bytes]);
  std::memset(p.get(), kSentinel, bytes);
  return p;
}

template <typename TB, typename TM>
void Run(Case& c, FILE* out) {
  const auto* base = reinterpret_cast<const TB*>(c.base.get());
  const auto* mem = reinterpret_cast<const TM*>(c.mem.get());
  const auto* table = reinterpret_cast<const float*>(c.table.get());
  const int rows = static_cast<int>(c.rows), vocab = static_cast<int>(c.vocab);
  cudaStream_t stream = nullptr;
  std::vector<std::pair<std::unique_ptr<unsigned char[]>, size_t>> outputs;
  auto output = [&](size_t bytes) {
    outputs.emplace_back(Output(bytes), bytes);
    return outputs.back().first.get();
  };
  if (c.kernel == kJoint) {
    auto* lp = reinterpret_cast<float*>(output(c.rows * c.vocab * sizeof(float)));
    LaunchJointLogprobs(base, c.base_stride, mem, c.mem_stride, rows, vocab, table, c.scalars, lp, stream);
  } else if (c.kernel == kTarget) {
    auto* joint = reinterpret_cast<float*>(output(c.rows * sizeof(float)));
    auto* lpb = reinterpret_cast<float*>(output(c.rows * sizeof(float)));
    auto* lpm = reinterpret_cast<float*>(output(c.rows * sizeof(float)));
    LaunchTargetLogprobs(base, c.base_stride, mem, c.mem_stride, rows, vocab,
                         reinterpret_cast<const int64_t*>(c.targets.get()), table, c.scalars, joint, lpb, lpm, stream);
  } else if (c.kernel == kSample || c.kernel == kSampleV2) {
    auto* tokens = reinterpret_cast<int64_t*>(output(c.rows * sizeof(int64_t)));
    auto* lps = reinterpret_cast<float*>(output(c.rows * sizeof(float)));
    std::unique_ptr<int64_t> seed_ptr(new int64_t(c.seed_value)), offset_ptr(new int64_t(c.offset_value));
    if (c.captured) {
      c.philox.seed_ptr = seed_ptr.get();
      c.philox.offset_ptr = offset_ptr.get();
    }
    if (c.kernel == kSample) {
      LaunchSample(base, c.base_stride, mem, c.mem_stride, rows, vocab, table, c.scalars, c.philox, tokens, lps, stream);
    } else {  // the workspace exactly as large as planned, and filled with the sentinel: no read before a write
      const SplitPlan plan = PlanSampleSplit(rows, vocab, static_cast<int>(c.max_blocks));
      std::unique_ptr<unsigned char[]> workspace = Output(plan.bytes);
      LaunchSampleSplit(base, c.base_stride, mem, c.mem_stride, rows, vocab, table, c.scalars, c.philox, tokens, lps,
                        plan, workspace.get(), stream);
    }
  } else {
    cudacpu::Fail("driver: unknown kernel %lld", static_cast<long long>(c.kernel));
  }
  for (const auto& [data, bytes] : outputs) {
    if (std::fwrite(data.get(), 1, bytes, out) != bytes) cudacpu::Fail("driver: cannot write the outputs");
  }
}

// Calls fn(TB{}, TM{}) for the case's element types, as the CUDA glue's dispatch does.
template <typename Fn>
void DispatchDtypes(int64_t base, int64_t mem, Fn&& fn) {
  auto with_mem = [&](auto b) {
    switch (mem) {
      case kF32: return fn(b, float{});
      case kF16: return fn(b, __half{});
      case kBF16: return fn(b, __nv_bfloat16{});
      default: cudacpu::Fail("driver: unknown dtype %lld", static_cast<long long>(mem));
    }
  };
  switch (base) {
    case kF32: return with_mem(float{});
    case kF16: return with_mem(__half{});
    case kBF16: return with_mem(__nv_bfloat16{});
    default: cudacpu::Fail("driver: unknown dtype %lld", static_cast<long long>(base));
  }
}

}  // namespace
}  // namespace memdec_fast

int main(int argc, char** argv) {
  using namespace memdec_fast;
  if (argc == 2 && std::strcmp(argv[1], "--shared") == 0) {
    std::printf("%ld\n", cudacpu::SharedBytes());
    return 0;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CASE OUT | --shared\n", argv[0]);
    return 2;
  }
  FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) cudacpu::Fail("driver: cannot open %s", argv[1]);
  Case c = ReadCase(in);
  std::fclose(in);
  FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) cudacpu::Fail("driver: cannot open %s", argv[2]);
  DispatchDtypes(c.base_dtype, c.mem_dtype, [&](auto b, auto m) { Run<decltype(b), decltype(m)>(c, out); });
  std::fclose(out);
  return 0;
}
