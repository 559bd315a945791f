// im2col and col2im for channel-major (C, N, H, W) tensors: the CUDA twins of
// kernels/src/ops/im2col.rs. The "big" side is a convolution's input (a transposed
// convolution's output), unrolled into cols (C*K*K, N*SH*SW) over the "small" side.

// cols[(c*K + ky)*K + kx][(n*SH + oy)*SW + ox] = big[c][n][oy*S + ky - P][ox*S + kx - P], or 0
// outside the image. One thread per element of cols: the writes are contiguous.
extern "C" __global__ void im2col(const float* __restrict__ big, float* __restrict__ cols, int C, int N, int H,
                                  int W, int SH, int SW, int K, int S, int P) {
    const long long ncols = (long long)N * SH * SW;
    const long long total = (long long)C * K * K * ncols;
    GRID_STRIDE_LOOP(i, total) {
        const long long row = i / ncols;
        const long long col = i - row * ncols;
        const int kx = (int)(row % K);
        const int ky = (int)((row / K) % K);
        const int c = (int)(row / ((long long)K * K));
        const int ox = (int)(col % SW);
        const int oy = (int)((col / SW) % SH);
        const int n = (int)(col / ((long long)SH * SW));
        const int iy = oy * S + ky - P;
        const int ix = ox * S + kx - P;
        float v = 0.0f;
        if (iy >= 0 && iy < H && ix >= 0 && ix < W) v = big[(((long long)c * N + n) * H + iy) * W + ix];
        cols[i] = v;
    }
}

// The adjoint of im2col: big[c][n][y][x] = sum of the cols entries that im2col read from it.
// One thread per big element gathers its (at most K*K) taps, in the CPU reference's (ky, kx)
// order, so there are no atomics and the result does not depend on scheduling.
extern "C" __global__ void col2im(const float* __restrict__ cols, float* __restrict__ big, int C, int N, int H,
                                  int W, int SH, int SW, int K, int S, int P) {
    const long long ncols = (long long)N * SH * SW;
    const long long total = (long long)C * N * H * W;
    GRID_STRIDE_LOOP(i, total) {
        const int x = (int)(i % W);
        const int y = (int)((i / W) % H);
        const int n = (int)((i / ((long long)W * H)) % N);
        const int c = (int)(i / ((long long)W * H * N));
        float acc = 0.0f;
        for (int ky = 0; ky < K; ++ky) {
            const int ty = y + P - ky;
            if (ty < 0 || ty % S != 0) continue;
            const int oy = ty / S;
            if (oy >= SH) continue;
            for (int kx = 0; kx < K; ++kx) {
                const int tx = x + P - kx;
                if (tx < 0 || tx % S != 0) continue;
                const int ox = tx / S;
                if (ox >= SW) continue;
                const long long row = ((long long)c * K + ky) * K + kx;
                acc += cols[row * ncols + ((long long)n * SH + oy) * SW + ox];
            }
        }
        big[i] = acc;
    }
}
