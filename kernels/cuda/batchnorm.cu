// BatchNorm2d over channel-major activations: the CUDA twins of kernels/src/ops/batchnorm.rs.
// A channel is one contiguous run of M = N*H*W values.
//
// Training reductions split each channel over P parts (P from bn_parts in
// kernels/src/cuda/ops.rs), one block of 256 threads per (channel, part): block b = c * P + p
// sums values [p * M / P, (p + 1) * M / P) of channel c in double and writes parts[b]. A
// finalize kernel, one thread per channel, then adds the channel's P parts in part order and
// rounds to f32 where the CPU reference does. No atomics: a step is bit-reproducible for a
// given (C, M). The element-wise passes run over the whole (C, M) tensor.
//
// Training forward (in place, x <- gamma * xhat + beta with batch statistics):
//   bn_partial_sums(squares = 0), bn_finalize_mean, bn_partial_sums(squares = 1),
//   bn_finalize_var, bn_normalize.
// Backward (in place, dy <- dx): bn_backward_partials, bn_backward_finalize, bn_backward_dx.
// saved = [mean (C), inv_std (C)] and gamma_beta = [gamma (C), beta (C)], adjacent as in the
// flat parameter buffer.

// Part `part` of `parts` of a channel of M values: [*begin, *end), balanced, never empty when
// parts <= M. part * M stays far below 2^63 (parts <= a few thousand, M < 2^40).
__device__ void bn_part_range(long long M, int parts, int part, long long* begin, long long* end) {
    *begin = (long long)part * M / parts;
    *end = (long long)(part + 1) * M / parts;
}

// Launched with C * P blocks. parts[c * P + p] <- the part's sum of x (squares = 0), or of
// (x - mean)^2 with mean = saved[c] from bn_finalize_mean (squares = 1): two passes, as the
// reference, since one pass (sum and sum of squares) cancels badly when |mean| >> std.
extern "C" __global__ void bn_partial_sums(const float* __restrict__ x, const float* __restrict__ saved,
                                           double* __restrict__ parts, long long M, int P, int squares) {
    const int c = (int)(blockIdx.x / (unsigned)P);
    const int p = (int)(blockIdx.x % (unsigned)P);
    const float* xs = x + (long long)c * M;
    long long begin, end;
    bn_part_range(M, P, p, &begin, &end);
    double s = 0.0;
    if (squares) {
        const float mean = saved[c];
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const float d = xs[i] - mean;
            s += (double)(d * d);
        }
    } else {
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) s += (double)xs[i];
    }
    // Every thread of the block reaches block_sum (it synchronises the block).
    const double total = block_sum(s);
    if (threadIdx.x == 0) parts[blockIdx.x] = total;
}

// saved[c] <- mean of channel c, from its P partial sums.
extern "C" __global__ void bn_finalize_mean(const double* __restrict__ parts, float* __restrict__ saved, int C,
                                            int P, long long M) {
    GRID_STRIDE_LOOP(c, C) {
        double s = 0.0;
        for (int p = 0; p < P; ++p) s += parts[c * P + p];
        const float sum = (float)s;
        saved[c] = (float)((double)sum / (double)M);
    }
}

// saved[C + c] <- inv_std of channel c, from the P partial sums of squared deviations; with
// update_running, moves the running statistics by `momentum` towards the batch's mean and
// unbiased variance (PyTorch's rule).
extern "C" __global__ void bn_finalize_var(const double* __restrict__ parts, float* __restrict__ saved,
                                           float* __restrict__ running_mean, float* __restrict__ running_var, int C,
                                           int P, long long M, int update_running, float momentum, float eps) {
    GRID_STRIDE_LOOP(c, C) {
        double q = 0.0;
        for (int p = 0; p < P; ++p) q += parts[c * P + p];
        const float sq = (float)q;
        const double var = (double)sq / (double)M;
        const float inv_std = (float)(1.0 / sqrt(var + (double)eps));
        const float mean = saved[c];
        saved[C + c] = inv_std;
        if (update_running) {
            const double unbiased = M > 1 ? var * (double)M / (double)(M - 1) : var;
            running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
            running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
        }
    }
}

// x <- gamma * xhat + beta, keeping xhat = (x - mean) * inv_std for backward.
extern "C" __global__ void bn_normalize(float* __restrict__ x, float* __restrict__ xhat,
                                        const float* __restrict__ gamma_beta, const float* __restrict__ saved, int C,
                                        long long M) {
    GRID_STRIDE_LOOP(i, (long long)C * M) {
        const int c = (int)(i / M);
        const float h = (x[i] - saved[c]) * saved[C + c];
        xhat[i] = h;
        x[i] = h * gamma_beta[c] + gamma_beta[C + c];
    }
}

// Eval forward, in place, with the running statistics (model.eval() in PyTorch).
extern "C" __global__ void bn_forward_eval(float* __restrict__ x, const float* __restrict__ gamma_beta,
                                           const float* __restrict__ running_mean,
                                           const float* __restrict__ running_var, int C, long long M, float eps) {
    GRID_STRIDE_LOOP(i, (long long)C * M) {
        const int c = (int)(i / M);
        const float inv = 1.0f / sqrtf(running_var[c] + eps);
        const float scale = gamma_beta[c] * inv;
        x[i] = (x[i] - running_mean[c]) * scale + gamma_beta[C + c];
    }
}

// Launched with C * P blocks. parts[c * P + p] <- the part's sum of dy, and
// parts[C * P + c * P + p] <- its sum of dy * xhat.
extern "C" __global__ void bn_backward_partials(const float* __restrict__ dy, const float* __restrict__ xhat,
                                                double* __restrict__ parts, int C, long long M, int P) {
    const int c = (int)(blockIdx.x / (unsigned)P);
    const int p = (int)(blockIdx.x % (unsigned)P);
    const float* d = dy + (long long)c * M;
    const float* h = xhat + (long long)c * M;
    long long begin, end;
    bn_part_range(M, P, p, &begin, &end);
    double s1 = 0.0, s2 = 0.0;
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        s1 += (double)d[i];
        s2 += (double)(d[i] * h[i]);
    }
    // Two calls in a row are fine: block_sum synchronises before its shared slots are reused.
    const double t1 = block_sum(s1);
    const double t2 = block_sum(s2);
    if (threadIdx.x == 0) {
        parts[blockIdx.x] = t1;
        parts[(long long)C * P + blockIdx.x] = t2;
    }
}

// totals = [sum_dy (C), sum_dy_xhat (C)] from the partial sums, rounded to f32 (and stored as
// doubles, exactly). With has_grads, adds them into grad_gamma_beta = [dgamma (C), dbeta (C)].
extern "C" __global__ void bn_backward_finalize(const double* __restrict__ parts, double* __restrict__ totals,
                                                float* __restrict__ grad_gamma_beta, int has_grads, int C, int P) {
    const long long second = (long long)C * P;
    GRID_STRIDE_LOOP(c, C) {
        double s1 = 0.0, s2 = 0.0;
        for (int p = 0; p < P; ++p) {
            s1 += parts[c * P + p];
            s2 += parts[second + c * P + p];
        }
        const float sum_dy = (float)s1;
        const float sum_dy_xhat = (float)s2;
        totals[c] = (double)sum_dy;
        totals[C + c] = (double)sum_dy_xhat;
        if (has_grads) {
            grad_gamma_beta[C + c] += sum_dy;
            grad_gamma_beta[c] += sum_dy_xhat;
        }
    }
}

// dy <- dx = gamma * inv_std / M * (M * dy - sum_dy - xhat * sum_dy_xhat).
extern "C" __global__ void bn_backward_dx(float* __restrict__ dy, const float* __restrict__ xhat,
                                          const float* __restrict__ gamma_beta, const float* __restrict__ saved,
                                          const double* __restrict__ totals, int C, long long M) {
    const float count = (float)M;
    GRID_STRIDE_LOOP(i, (long long)C * M) {
        const int c = (int)(i / M);
        const float sum_dy = (float)totals[c];
        const float sum_dy_xhat = (float)totals[C + c];
        const float scale = gamma_beta[c] * saved[C + c] / count;
        dy[i] = scale * (count * dy[i] - sum_dy - xhat[i] * sum_dy_xhat);
    }
}
