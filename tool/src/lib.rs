//! The `dcgan` research tool as a library: the DCGAN paper's experiments on any checkpoint
//! (latent walks, vector arithmetic on z, removal of generator feature maps, visualisation of
//! discriminator features, nearest neighbours) and the numbers that say whether a run is
//! getting better (FID on a trained classifier's features, D's features as a representation).
//!
//! Each module is one command or one piece of maths that commands share; the binary in
//! `main.rs` only parses arguments and dispatches. FID, the classifier it runs on, drawing
//! latents and running the generator live in `dcgan-fid` (crate `fid/`), which the
//! coordinator's `--eval-every` shares, so both compute the same FID.

pub mod ablate;
pub mod arithmetic;
pub mod checkpoint_ref;
pub mod convert;
pub mod download;
pub mod evaluate;
pub mod features;
pub mod generate;
pub mod interpolate;
pub mod nearest;
pub mod prepare;
pub mod visualize;
