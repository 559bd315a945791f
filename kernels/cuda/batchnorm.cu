// BatchNorm2d over channel-major activations: the CUDA twins of kernels/src/ops/batchnorm.rs.
// A channel is one contiguous run of M = N*H*W values; training kernels run one block per
// channel, and round their sums to f32 where the CPU reference does, so both backends agree to
// f32 rounding.

// Training forward, in place: x <- gamma * xhat + beta with batch statistics. Writes xhat (for
// backward) and saved = [mean (C), inv_std (C)], and, with update_running, moves the running
// statistics by `momentum` towards the batch's mean and unbiased variance (PyTorch's rule).
// gamma_beta = [gamma (C), beta (C)], adjacent as in the flat parameter buffer.
extern "C" __global__ void bn_forward_train(float* __restrict__ x, float* __restrict__ xhat,
                                            const float* __restrict__ gamma_beta, float* __restrict__ saved,
                                            float* __restrict__ running_mean, float* __restrict__ running_var, int C,
                                            long long M, int update_running, float momentum, float eps) {
    const int c = blockIdx.x;
    float* xs = x + (long long)c * M;
    float* hs = xhat + (long long)c * M;
    double s = 0.0;
    for (long long i = threadIdx.x; i < M; i += blockDim.x) s += (double)xs[i];
    // Two passes (mean, then squared deviations), as the reference: one pass cancels badly when
    // |mean| >> std.
    const float sum = (float)block_sum(s);
    const float mean = (float)((double)sum / (double)M);
    double q = 0.0;
    for (long long i = threadIdx.x; i < M; i += blockDim.x) {
        const float d = xs[i] - mean;
        q += (double)(d * d);
    }
    const float sq = (float)block_sum(q);
    const double var = (double)sq / (double)M;
    const float inv_std = (float)(1.0 / sqrt(var + (double)eps));
    if (threadIdx.x == 0) {
        saved[c] = mean;
        saved[C + c] = inv_std;
        if (update_running) {
            const double unbiased = M > 1 ? var * (double)M / (double)(M - 1) : var;
            running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
            running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
        }
    }
    const float g = gamma_beta[c];
    const float b = gamma_beta[C + c];
    for (long long i = threadIdx.x; i < M; i += blockDim.x) {
        const float h = (xs[i] - mean) * inv_std;
        hs[i] = h;
        xs[i] = h * g + b;
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

// Backward of the last training forward, in place: dy becomes dx. With has_grads, adds the
// gradients of gamma and beta into grad_gamma_beta = [dgamma (C), dbeta (C)]. One block per
// channel: the two sums, then the element-wise pass over the same channel.
extern "C" __global__ void bn_backward(float* __restrict__ dy, const float* __restrict__ xhat,
                                       const float* __restrict__ gamma_beta, const float* __restrict__ saved,
                                       float* __restrict__ grad_gamma_beta, int has_grads, int C, long long M) {
    const int c = blockIdx.x;
    float* d = dy + (long long)c * M;
    const float* h = xhat + (long long)c * M;
    double s1 = 0.0, s2 = 0.0;
    for (long long i = threadIdx.x; i < M; i += blockDim.x) {
        s1 += (double)d[i];
        s2 += (double)(d[i] * h[i]);
    }
    const float sum_dy = (float)block_sum(s1);
    const float sum_dy_xhat = (float)block_sum(s2);
    if (has_grads && threadIdx.x == 0) {
        grad_gamma_beta[C + c] += sum_dy;
        grad_gamma_beta[c] += sum_dy_xhat;
    }
    const float count = (float)M;
    const float scale = gamma_beta[c] * saved[C + c] / count;
    for (long long i = threadIdx.x; i < M; i += blockDim.x) {
        d[i] = scale * (count * d[i] - sum_dy - h[i] * sum_dy_xhat);
    }
}
