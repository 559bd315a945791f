//! `dcgan`: the DCGAN paper's experiments and FID, as commands on any checkpoint.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dcgan_tool::{ablate, arithmetic, convert, evaluate, generate, interpolate, nearest, prepare, visualize};

#[derive(Parser, Debug)]
#[command(name = "dcgan", version, about = "Research tool for DCGAN checkpoints: the paper's experiments and FID")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Samples as a grid PNG (or one PNG each), with the z used saved beside them.
    Generate(generate::GenerateArgs),
    /// Linear and spherical walks in latent space between chosen samples.
    Interpolate(interpolate::InterpolateArgs),
    /// Vector arithmetic on z: mean(A) - mean(B) + mean(C), with noise around the result.
    Arithmetic(arithmetic::ArithmeticArgs),
    /// Generation with feature maps of a generator layer removed, chosen by hand or by a
    /// logistic regression on marked regions.
    Ablate(ablate::AblateArgs),
    /// D's first-layer filters, and the images and guided-backprop maps of deeper features.
    Visualize(visualize::VisualizeArgs),
    /// Nearest training images of generated samples, in pixels and in D's features.
    Nearest(nearest::NearestArgs),
    /// FID on a trained classifier's features; D's features as a representation.
    #[command(subcommand)]
    Evaluate(evaluate::EvaluateCommand),
    /// PyTorch .pth <-> safetensors (needs python3 with torch).
    Convert(convert::ConvertArgs),
    /// A data set (MNIST, CIFAR-10, an image folder, a tar, LSUN's LMDB; or --download one) to
    /// packed u8 shards at the training size, that training reads from disk.
    Prepare(prepare::PrepareArgs),
}

/// Runs the command. A failure prints `error: ` and its causes, once each, in the same style as
/// `coordinator` and `worker` (never anyhow's `Error:` with a backtrace, whatever
/// `RUST_BACKTRACE` says: these are the user's errors, not the program's), and exits 1, or 2
/// for a usage error (clap's, and the commands' own checks of their arguments).
fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Interpolate(a) => interpolate::run(a),
        Command::Arithmetic(a) => arithmetic::run(a),
        Command::Ablate(a) => ablate::run(a),
        Command::Visualize(a) => visualize::run(a),
        Command::Nearest(a) => nearest::run(a),
        Command::Evaluate(c) => evaluate::run(c),
        Command::Convert(a) => convert::run(a),
        Command::Prepare(a) => prepare::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => dcgan_process::exit::report(&e),
    }
}
