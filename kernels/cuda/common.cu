// Helpers shared by the project's kernels. The .cu files are concatenated in the order
// kernels/src/cuda/module.rs lists them and compiled by NVRTC as one program, so this file
// comes first and nothing here is a kernel.

// Every kernel walks its elements with a grid-stride loop over 64-bit indices: the largest
// buffers (an im2col of 512 images) approach 2^31 elements.
#define GRID_STRIDE_LOOP(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)gridDim.x * blockDim.x)

// Sum of one double per thread over the whole block, returned to every thread. Partial sums are
// doubles so that a channel of half a million values keeps the CPU reference's f32 precision.
// Requires blockDim.x to be a multiple of 32 (launches use 256).
__device__ double block_sum(double v) {
    __shared__ double warp_sums[32];
    __shared__ double total;
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warp = threadIdx.x >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const unsigned warps = (blockDim.x + 31u) >> 5;
        double w = lane < warps ? warp_sums[lane] : 0.0;
        for (int offset = 16; offset > 0; offset >>= 1) w += __shfl_down_sync(0xffffffffu, w, offset);
        if (lane == 0) total = w;
    }
    __syncthreads();
    const double result = total;
    // The shared slots are reused by the next call: nobody may overwrite them before all read.
    __syncthreads();
    return result;
}

// The logistic function without overflow for large |x| (as ops/activation.rs).
__device__ float stable_sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    const float e = expf(x);
    return e / (1.0f + e);
}
