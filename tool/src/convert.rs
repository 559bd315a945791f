//! `dcgan convert`: PyTorch DCGAN example checkpoints (`netG_epoch_N.pth`) to this project's
//! safetensors files and back.
//!
//! `.pth` -> safetensors runs here, without Python: `pyformats::pth` reads the zip archive and
//! the state dict's pickle without executing anything (the subset `torch.save(net.state_dict())`
//! writes; anything else is refused, as `torch.load(weights_only=True)` would). Floating-point
//! tensors are written as float32, the dtype this project's networks hold.
//!
//! safetensors -> `.pth` still runs in `python3` with PyTorch: writing a pickle that
//! `torch.load` accepts means writing torch's own classes, which only torch does reliably.
//! Safetensors is read there by a few lines of plain Python, so the `safetensors` package is not
//! needed. Most commands here (`generate --checkpoint`, `coordinator --netG`) take a `.pth`
//! directly, so this direction is only for going back to PyTorch.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
dcgan convert --input netG_epoch_24.pth --output generator.safetensors\n  \
dcgan convert --input runs/mnist/checkpoints/step_00001000/generator.safetensors --output netG.pth\n\
The direction follows the extensions (.pth/.pt <-> .safetensors). .pth -> .safetensors needs no Python;\n\
.safetensors -> .pth runs python3 with torch.")]
pub struct ConvertArgs {
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    /// The Python interpreter (with torch) that writes .pth files; reading them needs none.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// The Python side of safetensors -> .pth: argv = [src, dst].
const SCRIPT: &str = r#"
import sys, json, struct, collections
import torch
src, dst = sys.argv[1], sys.argv[2]
FROM_ST = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32}
data = open(src, "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
sd = collections.OrderedDict()
for k, info in header.items():
    if k == "__metadata__":
        continue
    s, e = info["data_offsets"]
    t = torch.frombuffer(bytearray(data[8 + n + s:8 + n + e]), dtype=FROM_ST[info["dtype"]])
    sd[k] = t.reshape(info["shape"]).clone()
torch.save(sd, dst)
print(len(sd))
"#;

fn kind(p: &Path) -> Option<&'static str> {
    match p.extension().and_then(|e| e.to_str()) {
        Some("pth" | "pt") => Some("pth"),
        Some("safetensors") => Some("st"),
        _ => None,
    }
}

/// Fails with a clear message when the interpreter or PyTorch is missing.
fn check_torch(python: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-c", "import torch"])
        .output()
        .with_context(|| format!("cannot run `{python}`: writing .pth files needs Python with PyTorch"))?;
    if !out.status.success() {
        bail!(
            "PyTorch is not installed for `{python}` (`{python} -c 'import torch'` failed: {}); install it \
             (pip install torch) to write .pth files. Reading .pth files needs no Python.",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output").trim()
        );
    }
    Ok(())
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let to_safetensors = match (kind(&args.input), kind(&args.output)) {
        (Some("pth"), Some("st")) => true,
        (Some("st"), Some("pth")) => false,
        _ => bail!(
            "convert goes from .pth/.pt to .safetensors or back; got {} -> {}",
            args.input.display(),
            args.output.display()
        ),
    };
    if !args.input.is_file() {
        bail!("{}: no such file", args.input.display());
    }
    if to_safetensors { pth_to_safetensors(args) } else { safetensors_to_pth(args) }
}

/// Natively: the state dict read by `pyformats::pth`, floats as f32.
fn pth_to_safetensors(args: &ConvertArgs) -> Result<()> {
    let name = args.input.display().to_string();
    let bytes = std::fs::read(&args.input).with_context(|| format!("reading {name}"))?;
    let state = pyformats::pth::read(&bytes, &name)?.with_floats_as_f32();
    let out = state.to_safetensors(&name)?;
    std::fs::write(&args.output, &out).with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("wrote {} ({} tensors)", args.output.display(), state.tensors.len());
    match kernels::checkpoint::infer_generator_config(&out, &args.output.display().to_string()) {
        Ok(cfg) => eprintln!(
            "a DCGAN generator: {}x{} images, nc {}, nz {}, ngf {}; use it with --checkpoint {}",
            cfg.image_size,
            cfg.image_size,
            cfg.nc,
            cfg.nz,
            cfg.ngf,
            args.output.display()
        ),
        Err(e) => eprintln!("note: not loadable as a generator ({e}); a discriminator file is kept as is"),
    }
    Ok(())
}

/// Through `python3` with torch, which writes the pickle `torch.load` expects.
fn safetensors_to_pth(args: &ConvertArgs) -> Result<()> {
    check_torch(&args.python)?;
    let out = Command::new(&args.python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&args.input)
        .arg(&args.output)
        .output()
        .with_context(|| format!("running `{}`", args.python))?;
    if !out.status.success() {
        bail!("conversion of {} failed:\n{}", args.input.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let count = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("wrote {} ({count} tensors)", args.output.display());
    Ok(())
}
