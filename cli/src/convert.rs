//! `dcgan convert`: PyTorch DCGAN example checkpoints (`netG_epoch_N.pth`) to this project's
//! safetensors files and back.
//!
//! A `.pth` file is a Python pickle; reading one outside Python means reimplementing pickle and
//! trusting its contents, so the conversion runs in `python3` with PyTorch (`torch.load` with
//! `weights_only=True`, which refuses arbitrary objects). Safetensors is written and read by a
//! few lines of plain Python, so the `safetensors` package is not needed. Loading a
//! safetensors file saved by PyTorch needs no conversion at all: the names are the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
dcgan convert --input netG_epoch_24.pth --output generator.safetensors\n  \
dcgan convert --input runs/mnist/checkpoints/step_00001000/generator.safetensors --output netG.pth\n\
The direction follows the extensions (.pth/.pt <-> .safetensors). Needs python3 with torch.")]
pub struct ConvertArgs {
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    /// The Python interpreter to use.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

/// The Python side: argv = [direction, src, dst].
const SCRIPT: &str = r#"
import sys, json, struct, collections
import torch
direction, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
TO_ST = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32"}
FROM_ST = {v: k for k, v in TO_ST.items()}
if direction == "pth2st":
    obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        sys.exit(f"{src}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    header, blobs, off = {}, [], 0
    for k, t in obj.items():
        if not torch.is_tensor(t):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        t = t.detach().contiguous().cpu()
        if t.dtype not in TO_ST:
            sys.exit(f"{src}: tensor {k} has unsupported dtype {t.dtype}")
        b = t.numpy().tobytes()
        header[k] = {"dtype": TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    print(len(header))
else:
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
        .with_context(|| format!("cannot run `{python}`: converting .pth files needs Python with PyTorch"))?;
    if !out.status.success() {
        bail!(
            "PyTorch is not installed for `{python}` (`{python} -c 'import torch'` failed: {}); install it \
             (pip install torch) to convert .pth files. Safetensors files saved from PyTorch load with no conversion.",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("no output").trim()
        );
    }
    Ok(())
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let direction = match (kind(&args.input), kind(&args.output)) {
        (Some("pth"), Some("st")) => "pth2st",
        (Some("st"), Some("pth")) => "st2pth",
        _ => bail!(
            "convert goes from .pth/.pt to .safetensors or back; got {} -> {}",
            args.input.display(),
            args.output.display()
        ),
    };
    if !args.input.is_file() {
        bail!("{}: no such file", args.input.display());
    }
    check_torch(&args.python)?;
    let out = Command::new(&args.python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(direction)
        .arg(&args.input)
        .arg(&args.output)
        .output()
        .with_context(|| format!("running `{}`", args.python))?;
    if !out.status.success() {
        bail!("conversion of {} failed:\n{}", args.input.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    let count = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("wrote {} ({count} tensors)", args.output.display());
    if direction == "pth2st" {
        let bytes = std::fs::read(&args.output).with_context(|| format!("reading {}", args.output.display()))?;
        match kernels::checkpoint::infer_generator_config(&bytes, &args.output.display().to_string()) {
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
    }
    Ok(())
}
