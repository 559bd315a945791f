// Element-wise kernels: activations, the BCE-with-logits loss, Adam, and the NCHW <-> CNHW
// transpose at the API boundary. Each mirrors a CPU function in kernels/src/ops/ or tensor.rs.

// Activation codes, as kernels/src/cuda/ops.rs passes them.
#define ACT_RELU 0
#define ACT_LEAKY_RELU 1
#define ACT_TANH 2
#define ACT_SIGMOID 3

// The slope of LeakyReLU on negative inputs (ops::activation::LEAKY_SLOPE).
#define LEAKY_SLOPE 0.2f

// x <- act(x).
extern "C" __global__ void activation_forward(float* __restrict__ x, long long n, int act) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = x[i];
        float r;
        switch (act) {
            case ACT_RELU: r = fmaxf(v, 0.0f); break;
            case ACT_LEAKY_RELU: r = v < 0.0f ? v * LEAKY_SLOPE : v; break;
            case ACT_TANH: r = tanhf(v); break;
            default: r = stable_sigmoid(v); break;
        }
        x[i] = r;
    }
}

// dy <- dy * act'(x), from the output y = act(x). At 0, ReLU passes nothing and LeakyReLU the
// slope, as PyTorch.
extern "C" __global__ void activation_backward(const float* __restrict__ y, float* __restrict__ dy, long long n,
                                               int act) {
    GRID_STRIDE_LOOP(i, n) {
        const float out = y[i];
        const float d = dy[i];
        float r;
        switch (act) {
            case ACT_RELU: r = out <= 0.0f ? 0.0f : d; break;
            case ACT_LEAKY_RELU: r = out <= 0.0f ? d * LEAKY_SLOPE : d; break;
            case ACT_TANH: r = d * (1.0f - out * out); break;
            default: r = d * out * (1.0f - out); break;
        }
        dy[i] = r;
    }
}

// log(1 + e^x) without overflow.
__device__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// Mean BCE of sigmoid(logits) against the constant target, as ops/loss.rs: out[0] the loss,
// out[1] the mean of sigmoid(logits); grad = (sigmoid(x) - target) / n. One block: n is a batch.
extern "C" __global__ void bce_with_logits(const float* __restrict__ logits, float* __restrict__ grad,
                                           float* __restrict__ out, int n, float target) {
    const float log_clamp = 100.0f;
    double loss = 0.0, mean_p = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float x = logits[i];
        const float p = stable_sigmoid(x);
        const float log_p = p == 0.0f ? -log_clamp : fmaxf(-softplus(-x), -log_clamp);
        const float log_1mp = p == 1.0f ? -log_clamp : fmaxf(-softplus(x), -log_clamp);
        loss -= (double)(target * log_p + (1.0f - target) * log_1mp);
        mean_p += (double)p;
        grad[i] = (p - target) / (float)n;
    }
    loss = block_sum(loss);
    mean_p = block_sum(mean_p);
    if (threadIdx.x == 0) {
        out[0] = (float)(loss / (double)n);
        out[1] = (float)(mean_p / (double)n);
    }
}

// One Adam update of a flat buffer, as ops/adam.rs (torch.optim.Adam without weight decay):
// the host passes step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t).
extern "C" __global__ void adam_step(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, long long n, float beta1, float beta2, float eps,
                                     float step_size, float bias2_sqrt) {
    GRID_STRIDE_LOOP(i, n) {
        const float gi = g[i];
        const float mi = m[i] + (gi - m[i]) * (1.0f - beta1);
        const float vi = v[i] * beta2 + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bias2_sqrt + eps;
        p[i] -= step_size * (mi / denom);
    }
}

// dst (b, a, rest) <- src (a, b, rest): NCHW <-> CNHW (tensor::swap_leading_axes).
extern "C" __global__ void swap_leading_axes(const float* __restrict__ src, float* __restrict__ dst, long long a,
                                             long long b, long long rest) {
    GRID_STRIDE_LOOP(idx, a * b * rest) {
        const long long r = idx % rest;
        const long long j = (idx / rest) % b;
        const long long i = idx / (rest * b);
        dst[(j * a + i) * rest + r] = src[idx];
    }
}

// x <- x * factor: a rank's share of the global batch, before the gradients are averaged.
extern "C" __global__ void scale(float* __restrict__ x, long long n, float factor) {
    GRID_STRIDE_LOOP(i, n) { x[i] *= factor; }
}
