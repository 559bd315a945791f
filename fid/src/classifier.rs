//! The small CNN whose features FID is computed on.
//!
//! Inception features, FID's usual choice, describe ImageNet photographs and say little about
//! 32x32 digits; the standard practice for MNIST-like data is a classifier trained on the
//! dataset's own labels. This one is built like D (strided 4x4 convolutions, BatchNorm,
//! LeakyReLU; kernels' layers and GEMM) with a `classes`-way head. Its features are the last
//! hidden block, average-pooled over space. Training takes a minute or two on a CPU, so the
//! trained network is cached in a file keyed by everything that shapes it, and reused.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail, ensure};
use kernels::net::Net;
use kernels::ops::batchnorm::BnMode;
use kernels::tensor::swap_leading_axes;
use kernels::{ModelConfig, OptimConfig};
use rand::seq::SliceRandom;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::linear::{argmax, softmax_cross_entropy};

/// Tags the cache file layout. (It names the crate this code first lived in, `dcgan-cli`; kept,
/// so the classifiers cached before the move are still reused.)
const FORMAT: &str = "dcgan-cli/fid-classifier-v1";

/// Everything that determines the trained network: a cached file is reused only when its key is
/// equal to the one asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassifierKey {
    /// The dataset spec it was trained on.
    pub dataset: String,
    pub image_size: usize,
    pub nc: usize,
    pub classes: usize,
    /// Feature maps of the first layer (doubling at each layer, as in D).
    pub width: usize,
    pub epochs: usize,
    /// Training images used (the first N), None for all.
    pub train_limit: Option<usize>,
    pub seed: u64,
}

impl ClassifierKey {
    /// A short stable name for the default cache file.
    pub fn file_name(&self) -> String {
        // FNV-1a of the key's JSON: stable across runs and platforms (std's hasher is not).
        let json = serde_json::to_string(self).unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        let kind = self.dataset.split(':').next().unwrap_or("data");
        format!("fid-classifier-{kind}-{}px-{h:016x}.safetensors", self.image_size)
    }
}

pub struct Classifier {
    pub key: ClassifierKey,
    net: Net,
    /// Accuracy on its training data at the end of training.
    pub train_accuracy: f64,
}

fn architecture(key: &ClassifierKey) -> Result<Net> {
    let cfg = ModelConfig { image_size: key.image_size, nc: key.nc, nz: 1, ngf: key.width, ndf: key.width };
    cfg.validate().map_err(|e| anyhow!("FID classifier for {}: {e}", key.dataset))?;
    let mut specs = kernels::models::discriminator_specs(&cfg);
    if let Some(head) = specs.last_mut() {
        head.shape.out_channels = key.classes;
    }
    Ok(Net::new(key.image_size, &specs))
}

impl Classifier {
    /// Trains on NCHW `images` in [-1, 1] with `labels`, minibatch Adam on softmax
    /// cross-entropy; prints one line per epoch to stderr.
    pub fn train(key: ClassifierKey, images: &[f32], labels: &[u8]) -> Result<Self> {
        let mut net = architecture(&key)?;
        kernels::models::initialise(&mut net, key.seed, 7);
        let per = key.nc * key.image_size * key.image_size;
        let n = labels.len();
        ensure!(images.len() == n * per, "classifier training data: {} values for {n} images", images.len());
        ensure!(n >= 2, "the FID classifier needs at least two labelled training images");
        let optim = OptimConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        const BATCH: usize = 64;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = kernels::rng::stream(&[0xC1A5, key.seed]);
        let (mut xb, mut xc, mut yb) = (Vec::new(), Vec::new(), Vec::new());
        let (mut logits_nk, mut grad_nk, mut grad_kn) = (Vec::new(), Vec::new(), Vec::new());
        let k = key.classes;
        let mut accuracy = 0.0;
        for epoch in 0..key.epochs {
            order.shuffle(&mut rng);
            let (mut loss_sum, mut correct, mut batches) = (0.0f64, 0usize, 0usize);
            for idx in order.chunks(BATCH) {
                let b = idx.len();
                if b < 2 {
                    continue; // BatchNorm needs more than one image.
                }
                xb.clear();
                yb.clear();
                for &i in idx {
                    xb.extend_from_slice(&images[i * per..(i + 1) * per]);
                    yb.push(labels[i]);
                }
                xc.resize(xb.len(), 0.0);
                swap_leading_axes(&xb, b, key.nc, key.image_size * key.image_size, &mut xc);
                net.zero_grads();
                let out = net
                    .forward(&xc, b, BnMode::Train { update_running: true }, None)
                    .map_err(|e| anyhow!("classifier forward: {e}"))?;
                logits_nk.resize(b * k, 0.0);
                swap_leading_axes(out, k, b, 1, &mut logits_nk);
                grad_nk.resize(b * k, 0.0);
                let (loss, c) = softmax_cross_entropy(&logits_nk, &yb, k, &mut grad_nk);
                grad_kn.resize(b * k, 0.0);
                swap_leading_axes(&grad_nk, b, k, 1, &mut grad_kn);
                net.backward(&grad_kn, true, false, None).map_err(|e| anyhow!("classifier backward: {e}"))?;
                net.adam.step(&optim, &mut net.params, &net.grads);
                loss_sum += loss as f64;
                correct += c;
                batches += 1;
            }
            accuracy = correct as f64 / n as f64;
            eprintln!(
                "FID classifier epoch {}/{}: loss {:.4}, training accuracy {:.4}",
                epoch + 1,
                key.epochs,
                loss_sum / batches.max(1) as f64,
                accuracy
            );
        }
        recalibrate_batch_norm(&mut net, &key, images)?;
        Ok(Self { key, net, train_accuracy: accuracy })
    }

    /// Length of a feature vector.
    pub fn feature_len(&self) -> usize {
        let b = self.net.blocks.len();
        self.net.blocks[b - 2].shape.out_channels
    }

    /// Features (row-major, n x [`Classifier::feature_len`]) and predicted classes of NCHW
    /// images, with running statistics.
    pub fn features(&mut self, images: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        let per = self.key.nc * self.key.image_size * self.key.image_size;
        ensure!(
            images.len() % per == 0,
            "images do not match the classifier's {}x{} input",
            self.key.image_size,
            self.key.image_size
        );
        let n_all = images.len() / per;
        let d = self.feature_len();
        let k = self.key.classes;
        let feature_block = self.net.blocks.len() - 2;
        let mut feats = vec![0.0; n_all * d];
        let mut preds = Vec::with_capacity(n_all);
        let mut xc = Vec::new();
        for start in (0..n_all).step_by(256) {
            let n = 256.min(n_all - start);
            let part = &images[start * per..(start + n) * per];
            xc.resize(part.len(), 0.0);
            swap_leading_axes(part, n, self.key.nc, self.key.image_size * self.key.image_size, &mut xc);
            let out = self.net.forward(&xc, n, BnMode::Eval, None).map_err(|e| anyhow!("classifier forward: {e}"))?;
            let mut logits = vec![0.0; n * k];
            swap_leading_axes(out, k, n, 1, &mut logits);
            preds.extend(logits.chunks(k).map(argmax));
            let b = &self.net.blocks[feature_block];
            let plane = b.out_side * b.out_side;
            let y = b.output();
            for ch in 0..d {
                for i in 0..n {
                    let m = y[(ch * n + i) * plane..][..plane].iter().sum::<f32>() / plane as f32;
                    feats[(start + i) * d + ch] = m;
                }
            }
        }
        Ok((feats, preds))
    }

    /// Writes the network and its key to a safetensors file (atomically: temporary file, then
    /// rename, so an interrupted run never leaves a half-written cache that a later run trusts).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
            vec![("params".into(), vec![self.net.params.len()], bytes(&self.net.params))];
        for (i, bn) in self.net.batch_norms().enumerate() {
            tensors.push((format!("bn{i}.running_mean"), vec![bn.channels], bytes(&bn.running_mean)));
            tensors.push((format!("bn{i}.running_var"), vec![bn.channels], bytes(&bn.running_var)));
        }
        let views = tensors
            .iter()
            .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("key".to_string(), serde_json::to_string(&self.key)?);
        meta.insert("train_accuracy".to_string(), self.train_accuracy.to_string());
        let data = safetensors::serialize(views, Some(meta))?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp =
            tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
        std::fs::write(tmp.path(), data).with_context(|| format!("writing {}", tmp.path().display()))?;
        tmp.persist(path).map_err(|e| anyhow!("writing {}: {}", path.display(), e.error))?;
        Ok(())
    }

    /// Reads a cached classifier; `Ok(None)` if the file was trained for a different key.
    pub fn load(path: &Path, key: &ClassifierKey) -> Result<Option<Self>> {
        let what = || format!("FID classifier {}", path.display());
        let data = std::fs::read(path).with_context(what)?;
        let (_, header) =
            SafeTensors::read_metadata(&data).with_context(|| format!("{}: not a safetensors file", what()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{}: not a classifier written by dcgan evaluate", what());
        }
        let stored: ClassifierKey = serde_json::from_str(meta.get("key").map(String::as_str).unwrap_or(""))
            .with_context(|| format!("{}: unreadable key", what()))?;
        if &stored != key {
            return Ok(None);
        }
        let train_accuracy = meta.get("train_accuracy").and_then(|s| s.parse().ok()).unwrap_or(f64::NAN);
        let st = SafeTensors::deserialize(&data).with_context(|| format!("{}: not a safetensors file", what()))?;
        let mut net = architecture(key)?;
        let read = |name: &str, out: &mut [f32]| -> Result<()> {
            let t = st.tensor(name).with_context(|| format!("{}: tensor {name} is missing", what()))?;
            ensure!(
                t.dtype() == Dtype::F32 && t.data().len() == out.len() * 4,
                "{}: tensor {name} has the wrong size",
                what()
            );
            for (o, b) in out.iter_mut().zip(t.data().chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            Ok(())
        };
        read("params", &mut net.params)?;
        let mut i = 0;
        for block in &mut net.blocks {
            if let Some(bn) = &mut block.bn {
                read(&format!("bn{i}.running_mean"), &mut bn.layer.running_mean)?;
                read(&format!("bn{i}.running_var"), &mut bn.layer.running_var)?;
                i += 1;
            }
        }
        Ok(Some(Self { key: key.clone(), net, train_accuracy }))
    }
}

/// Batches used to measure the BatchNorm statistics after training.
const CALIBRATION_BATCHES: usize = 20;

/// Replaces each BatchNorm's running statistics with the mean of its batch statistics over up
/// to [`CALIBRATION_BATCHES`] batches of 256 training images ("precise BN").
///
/// The exponential average kernels keeps (momentum 0.1, starting at mean 0, variance 1) needs
/// a few hundred steps to forget its start; a classifier trained briefly on a small set would
/// otherwise compute its eval-mode features with statistics that are mostly the initial ones,
/// which shrinks every feature and with them every FID. Kernels does not expose a batch's
/// statistics, so each is recovered from the update `new = 0.9 old + 0.1 batch`.
fn recalibrate_batch_norm(net: &mut Net, key: &ClassifierKey, images: &[f32]) -> Result<()> {
    use kernels::ops::batchnorm::MOMENTUM;
    let per = key.nc * key.image_size * key.image_size;
    let n_all = images.len() / per;
    let batch = 256.min(n_all);
    let bns = net.batch_norms().count();
    let mut sums: Vec<(Vec<f64>, Vec<f64>)> =
        net.batch_norms().map(|b| (vec![0.0; b.channels], vec![0.0; b.channels])).collect();
    let mut xc = Vec::new();
    let mut used = 0;
    for start in (0..n_all.saturating_sub(batch - 1)).step_by(batch).take(CALIBRATION_BATCHES) {
        if batch < 2 || bns == 0 {
            break;
        }
        let old: Vec<(Vec<f32>, Vec<f32>)> =
            net.batch_norms().map(|b| (b.running_mean.clone(), b.running_var.clone())).collect();
        let part = &images[start * per..(start + batch) * per];
        xc.resize(part.len(), 0.0);
        swap_leading_axes(part, batch, key.nc, key.image_size * key.image_size, &mut xc);
        net.forward(&xc, batch, BnMode::Train { update_running: true }, None)
            .map_err(|e| anyhow!("classifier forward: {e}"))?;
        for ((bn, (om, ov)), (sm, sv)) in net.batch_norms().zip(&old).zip(sums.iter_mut()) {
            for c in 0..bn.channels {
                let recover = |new: f32, old: f32| ((new - (1.0 - MOMENTUM) * old) / MOMENTUM) as f64;
                sm[c] += recover(bn.running_mean[c], om[c]);
                sv[c] += recover(bn.running_var[c], ov[c]);
            }
        }
        used += 1;
    }
    if used == 0 {
        return Ok(());
    }
    let mut i = 0;
    for block in &mut net.blocks {
        if let Some(bn) = &mut block.bn {
            let (sm, sv) = &sums[i];
            for c in 0..bn.layer.channels {
                bn.layer.running_mean[c] = (sm[c] / used as f64) as f32;
                bn.layer.running_var[c] = ((sv[c] / used as f64) as f32).max(0.0);
            }
            i += 1;
        }
    }
    Ok(())
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
