//! Checkpoints: safetensors in the PyTorch example's `state_dict` layout, Adam's state and the
//! training state beside them.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::KernelError;

/// File names inside one checkpoint.
pub const GENERATOR_FILE: &str = "generator.safetensors";
pub const DISCRIMINATOR_FILE: &str = "discriminator.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Where a run stands, saved beside the weights so that a resumed run continues exactly.
///
/// Noise streams are keyed by (seed, rank, step) (see [`crate::rng`]), so the step counter and
/// the seed are the whole RNG state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Global steps completed.
    pub step: u64,
    /// Epoch the next step belongs to.
    pub epoch: u64,
    /// Steps of that epoch already done.
    pub step_in_epoch: u64,
    /// The run's seed.
    pub seed: u64,
    /// The run's whole configuration, as the caller records it.
    pub config: serde_json::Value,
}

/// One checkpoint as named byte blobs, ready to be written to a directory or streamed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckpointFiles {
    pub files: Vec<(String, Vec<u8>)>,
}

impl CheckpointFiles {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice())
    }

    /// Writes every file into `dir` (created if missing). Not atomic: callers that need
    /// atomicity write into a temporary directory and rename it.
    pub fn write_to_dir(&self, dir: &Path) -> Result<(), KernelError> {
        let io = |path: &Path, source| KernelError::Io { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for (name, bytes) in &self.files {
            let path = dir.join(name);
            std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }

    /// Reads the four checkpoint files from `dir`, naming the one that is missing.
    pub fn read_from_dir(dir: &Path) -> Result<Self, KernelError> {
        let mut files = Vec::new();
        for name in [GENERATOR_FILE, DISCRIMINATOR_FILE, OPTIMIZER_FILE, STATE_FILE] {
            let path = dir.join(name);
            let bytes =
                std::fs::read(&path).map_err(|source| KernelError::Io { path: path.display().to_string(), source })?;
            files.push((name.to_string(), bytes));
        }
        Ok(Self { files })
    }
}

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::gan::Gan;
use crate::models::module_indices;
use crate::net::Net;
use crate::ops::adam::Adam;
use crate::{ModelConfig, OptimConfig};

/// Tags the `state.json` layout so that a future change can be recognised.
const FORMAT: &str = "dcgan-at-scale/checkpoint-v1";

/// The JSON document beside the weights.
#[derive(Serialize, Deserialize)]
struct StateDocument {
    format: String,
    model: ModelConfig,
    optim: OptimConfig,
    training: TrainingState,
}

/// One named tensor on its way into a safetensors file.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Entry {
    fn f32(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        Self { name, dtype: Dtype::F32, shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }
    fn i64(name: String, shape: Vec<usize>, value: i64) -> Self {
        Self { name, dtype: Dtype::I64, shape, bytes: value.to_le_bytes().to_vec() }
    }
}

fn serialize(file: &str, entries: &[Entry]) -> Result<Vec<u8>, KernelError> {
    let views = entries
        .iter()
        .map(|e| {
            Ok((e.name.clone(), TensorView::new(e.dtype, e.shape.clone(), &e.bytes).map_err(|err| fail(file, err))?))
        })
        .collect::<Result<Vec<_>, KernelError>>()?;
    safetensors::serialize(views, None).map_err(|e| fail(file, e))
}

fn fail(file: &str, reason: impl std::fmt::Display) -> KernelError {
    KernelError::Checkpoint { file: file.to_string(), reason: reason.to_string() }
}

/// The network's `state_dict` in the PyTorch example's names and layouts.
fn state_dict(net: &Net) -> Vec<Entry> {
    let mut out = Vec::new();
    for (block, idx) in net.blocks.iter().zip(module_indices(net)) {
        let s = block.shape;
        let shape = match block.kind {
            crate::net::ConvKind::Conv => vec![s.out_channels, s.in_channels, s.kernel, s.kernel],
            crate::net::ConvKind::Transposed => vec![s.in_channels, s.out_channels, s.kernel, s.kernel],
        };
        out.push(Entry::f32(format!("main.{}.weight", idx.conv), shape, &net.params[block.weight.clone()]));
        if let (Some(bn), Some(i)) = (&block.bn, idx.batch_norm) {
            let c = vec![bn.layer.channels];
            out.push(Entry::f32(format!("main.{i}.weight"), c.clone(), &net.params[bn.gamma.clone()]));
            out.push(Entry::f32(format!("main.{i}.bias"), c.clone(), &net.params[bn.beta.clone()]));
            out.push(Entry::f32(format!("main.{i}.running_mean"), c.clone(), &bn.layer.running_mean));
            out.push(Entry::f32(format!("main.{i}.running_var"), c, &bn.layer.running_var));
            out.push(Entry::i64(format!("main.{i}.num_batches_tracked"), vec![], bn.layer.num_batches_tracked));
        }
    }
    out
}

/// A network's weights as a safetensors file that `torch.nn.Module.load_state_dict` accepts.
pub fn network_to_safetensors(net: &Net, file: &str) -> Result<Vec<u8>, KernelError> {
    serialize(file, &state_dict(net))
}

/// Reads one tensor, refusing a missing name, a wrong dtype or a wrong shape.
fn read_tensor<'a>(
    st: &SafeTensors<'a>,
    file: &str,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], KernelError> {
    let view = st.tensor(name).map_err(|_| fail(file, format!("tensor {name} is missing")))?;
    if view.dtype() != dtype {
        return Err(fail(file, format!("tensor {name} has dtype {:?}, expected {dtype:?}", view.dtype())));
    }
    // PyTorch writes num_batches_tracked as a 0-d tensor; accept a 1-element vector as well.
    let same = view.shape() == shape || (shape.is_empty() && view.shape() == [1]);
    if !same {
        return Err(fail(file, format!("tensor {name} has shape {:?}, expected {shape:?}", view.shape())));
    }
    Ok(view.data())
}

fn read_f32_into(
    st: &SafeTensors,
    file: &str,
    name: &str,
    shape: &[usize],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let bytes = read_tensor(st, file, name, Dtype::F32, shape)?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

fn parse<'a>(bytes: &'a [u8], file: &str) -> Result<SafeTensors<'a>, KernelError> {
    SafeTensors::deserialize(bytes).map_err(|e| fail(file, format!("not a valid safetensors file ({e})")))
}

/// Fills `net` from a `state_dict` file, checking every tensor's name, dtype and shape.
pub fn load_network(net: &mut Net, bytes: &[u8], file: &str) -> Result<(), KernelError> {
    let st = parse(bytes, file)?;
    let expected = state_dict(net);
    for name in st.names() {
        if !expected.iter().any(|e| e.name == name) {
            return Err(fail(file, format!("unexpected tensor {name}: the file is for a different architecture")));
        }
    }
    let indices = module_indices(net);
    for (b, idx) in indices.iter().enumerate() {
        let block = &net.blocks[b];
        let s = block.shape;
        let shape = match block.kind {
            crate::net::ConvKind::Conv => [s.out_channels, s.in_channels, s.kernel, s.kernel],
            crate::net::ConvKind::Transposed => [s.in_channels, s.out_channels, s.kernel, s.kernel],
        };
        let w = block.weight.clone();
        read_f32_into(&st, file, &format!("main.{}.weight", idx.conv), &shape, &mut net.params[w])?;
        if let Some(i) = idx.batch_norm {
            let bn = net.blocks[b].bn.as_ref().map(|bn| (bn.gamma.clone(), bn.beta.clone(), bn.layer.channels));
            let Some((gamma, beta, c)) = bn else { continue };
            read_f32_into(&st, file, &format!("main.{i}.weight"), &[c], &mut net.params[gamma])?;
            read_f32_into(&st, file, &format!("main.{i}.bias"), &[c], &mut net.params[beta])?;
            let Some(bn) = net.blocks[b].bn.as_mut() else { continue };
            read_f32_into(&st, file, &format!("main.{i}.running_mean"), &[c], &mut bn.layer.running_mean)?;
            read_f32_into(&st, file, &format!("main.{i}.running_var"), &[c], &mut bn.layer.running_var)?;
            let name = format!("main.{i}.num_batches_tracked");
            let raw = read_tensor(&st, file, &name, Dtype::I64, &[])?;
            let arr: [u8; 8] = raw.try_into().map_err(|_| fail(file, format!("tensor {name} is not one int64")))?;
            bn.layer.num_batches_tracked = i64::from_le_bytes(arr);
        }
    }
    Ok(())
}

fn adam_entries(prefix: &str, adam: &Adam) -> Vec<Entry> {
    vec![
        Entry::f32(format!("{prefix}.exp_avg"), vec![adam.exp_avg.len()], &adam.exp_avg),
        Entry::f32(format!("{prefix}.exp_avg_sq"), vec![adam.exp_avg_sq.len()], &adam.exp_avg_sq),
        Entry::i64(format!("{prefix}.step"), vec![], adam.step as i64),
    ]
}

fn load_adam(st: &SafeTensors, file: &str, prefix: &str, adam: &mut Adam) -> Result<(), KernelError> {
    let n = adam.exp_avg.len();
    read_f32_into(st, file, &format!("{prefix}.exp_avg"), &[n], &mut adam.exp_avg)?;
    read_f32_into(st, file, &format!("{prefix}.exp_avg_sq"), &[n], &mut adam.exp_avg_sq)?;
    let name = format!("{prefix}.step");
    let raw = read_tensor(st, file, &name, Dtype::I64, &[])?;
    let arr: [u8; 8] = raw.try_into().map_err(|_| fail(file, format!("tensor {name} is not one int64")))?;
    adam.step = u64::try_from(i64::from_le_bytes(arr)).map_err(|_| fail(file, format!("tensor {name} is negative")))?;
    Ok(())
}

pub(crate) fn save(gan: &Gan, state: &TrainingState) -> Result<CheckpointFiles, KernelError> {
    let mut optimizer = adam_entries("generator", &gan.g.adam);
    optimizer.extend(adam_entries("discriminator", &gan.d.adam));
    let doc = StateDocument {
        format: FORMAT.into(),
        model: gan.model.clone(),
        optim: gan.optim.clone(),
        training: state.clone(),
    };
    let json = serde_json::to_vec_pretty(&doc).map_err(|e| fail(STATE_FILE, e))?;
    Ok(CheckpointFiles {
        files: vec![
            (GENERATOR_FILE.into(), network_to_safetensors(&gan.g, GENERATOR_FILE)?),
            (DISCRIMINATOR_FILE.into(), network_to_safetensors(&gan.d, DISCRIMINATOR_FILE)?),
            (OPTIMIZER_FILE.into(), serialize(OPTIMIZER_FILE, &optimizer)?),
            (STATE_FILE.into(), json),
        ],
    })
}

pub(crate) fn load(files: &CheckpointFiles) -> Result<(Gan, TrainingState), KernelError> {
    let get = |name: &str| files.get(name).ok_or_else(|| fail(name, "missing from the checkpoint"));
    let doc: StateDocument = serde_json::from_slice(get(STATE_FILE)?)
        .map_err(|e| fail(STATE_FILE, format!("not a valid state document ({e})")))?;
    if doc.format != FORMAT {
        return Err(fail(STATE_FILE, format!("format {:?} is not {FORMAT:?}", doc.format)));
    }
    doc.model.validate()?;
    // The networks are allocated from the state document's sizes: check first that the files
    // can hold that many parameters, so a forged or corrupt document cannot make the loader
    // allocate gigabytes (fuzz/regressions/checkpoint/ keeps such a document).
    for (file, specs) in [
        (GENERATOR_FILE, crate::models::generator_specs(&doc.model)),
        (DISCRIMINATOR_FILE, crate::models::discriminator_specs(&doc.model)),
    ] {
        let params: usize =
            specs.iter().map(|s| s.shape.weight_len() + if s.batch_norm { 2 * s.shape.out_channels } else { 0 }).sum();
        let bytes = get(file)?.len();
        if params.saturating_mul(4) > bytes {
            return Err(fail(
                STATE_FILE,
                format!("declares networks of {params} parameters, but {file} holds only {bytes} bytes"),
            ));
        }
    }
    let mut gan = Gan::uninitialised(doc.model, doc.optim)?;
    load_network(&mut gan.g, get(GENERATOR_FILE)?, GENERATOR_FILE)?;
    load_network(&mut gan.d, get(DISCRIMINATOR_FILE)?, DISCRIMINATOR_FILE)?;
    let bytes = get(OPTIMIZER_FILE)?;
    let st = parse(bytes, OPTIMIZER_FILE)?;
    load_adam(&st, OPTIMIZER_FILE, "generator", &mut gan.g.adam)?;
    load_adam(&st, OPTIMIZER_FILE, "discriminator", &mut gan.d.adam)?;
    Ok((gan, doc.training))
}

/// The generator's shape read off a PyTorch-style `state_dict`: nz and nc from the first and
/// last weights, the image size from the number of transposed convolutions. `ndf` is not in a
/// generator file and is set to `ngf`.
pub fn infer_generator_config(bytes: &[u8], file: &str) -> Result<ModelConfig, KernelError> {
    let st = parse(bytes, file)?;
    let mut convs: Vec<(usize, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            let idx = name.strip_prefix("main.")?.strip_suffix(".weight")?.parse::<usize>().ok()?;
            (view.shape().len() == 4).then(|| (idx, view.shape().to_vec()))
        })
        .collect();
    convs.sort();
    let (Some(first), Some(last)) = (convs.first(), convs.last()) else {
        return Err(fail(file, "no main.N.weight convolution tensors: not a DCGAN generator"));
    };
    let layers = convs.len();
    let image_size = 1usize.checked_shl(layers as u32 + 1).unwrap_or(0);
    let l = layers.saturating_sub(1).max(1);
    let cfg = ModelConfig {
        image_size,
        nc: last.1[1],
        nz: first.1[0],
        ngf: first.1[1] >> (l - 1),
        ndf: first.1[1] >> (l - 1),
    };
    cfg.validate().map_err(|e| fail(file, format!("does not describe a supported generator: {e}")))?;
    Ok(cfg)
}

impl Gan {
    /// A Gan whose generator comes from a PyTorch-style `state_dict` file (the discriminator is
    /// freshly initialised): for generating from checkpoints trained elsewhere.
    pub fn from_generator_file(bytes: &[u8], file: &str, seed: u64) -> Result<Self, KernelError> {
        let cfg = infer_generator_config(bytes, file)?;
        let mut gan = Gan::new(cfg, OptimConfig::default(), seed)?;
        load_network(&mut gan.g, bytes, file)?;
        Ok(gan)
    }

    /// The generator alone, as a `state_dict` safetensors file.
    pub fn generator_safetensors(&self) -> Result<Vec<u8>, KernelError> {
        network_to_safetensors(&self.g, GENERATOR_FILE)
    }
}

/// `values` (a network's flat parameters or gradients) cut into the `state_dict` names of the
/// parameters they belong to: for comparing gradients with another framework's.
pub fn named_parameter_slices<'a>(net: &Net, values: &'a [f32]) -> Vec<(String, &'a [f32])> {
    let mut out = Vec::new();
    for (block, idx) in net.blocks.iter().zip(module_indices(net)) {
        out.push((format!("main.{}.weight", idx.conv), &values[block.weight.clone()]));
        if let (Some(bn), Some(i)) = (&block.bn, idx.batch_norm) {
            out.push((format!("main.{i}.weight"), &values[bn.gamma.clone()]));
            out.push((format!("main.{i}.bias"), &values[bn.beta.clone()]));
        }
    }
    out
}

impl Gan {
    /// Replaces the generator's weights and buffers with a `state_dict` file's.
    pub fn load_generator_state(&mut self, bytes: &[u8], file: &str) -> Result<(), KernelError> {
        load_network(&mut self.g, bytes, file)
    }

    /// Replaces the discriminator's weights and buffers with a `state_dict` file's.
    pub fn load_discriminator_state(&mut self, bytes: &[u8], file: &str) -> Result<(), KernelError> {
        load_network(&mut self.d, bytes, file)
    }

    /// The last step's generator gradients by parameter name.
    pub fn generator_gradients_named(&self) -> Vec<(String, &[f32])> {
        named_parameter_slices(&self.g, &self.g.grads)
    }

    /// The last D step's discriminator gradients by parameter name.
    pub fn discriminator_gradients_named(&self) -> Vec<(String, &[f32])> {
        named_parameter_slices(&self.d, &self.d.grads)
    }
}
