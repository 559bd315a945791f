//! FID (Fréchet Inception Distance, on a classifier trained on the data set's own labels rather
//! than Inception) of a DCGAN generator, and the pieces it is built from. The `dcgan` tool
//! (`dcgan evaluate fid`, and its other commands for [`latent`] and [`render`]) and the
//! coordinator (`--eval-every`) both score with this crate, so the figures of a run and of the
//! command agree.
//!
//! [`fid_score`] prepares a real reference once and scores generators or images against it;
//! [`fid`] is the Fréchet distance between two sets of features; [`classifier`] is the CNN the
//! features come from, trained and cached; [`linear`] its softmax head (and the tool's logistic
//! regressions); [`latent`] draws the z a generator is run on and [`render`] runs it.

pub mod classifier;
pub mod fid;
pub mod fid_score;
pub mod latent;
pub mod linear;
pub mod render;
