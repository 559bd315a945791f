//! The workers' clean-stop vote rides in the generator's gradient average: every rank learns
//! the mean of the votes from the step itself, and the step's numbers do not change by a bit.

mod common;

use common::threads::{ThreadCollective, shared};
use kernels::{Gan, ModelConfig, OptimConfig, SingleProcess, StepShare, Tensor};

fn cfg() -> ModelConfig {
    ModelConfig { image_size: 32, nc: 1, nz: 8, ngf: 4, ndf: 4 }
}

/// Each rank's batch of step `step`.
fn batch(rank: usize, step: u64, n: usize) -> (Tensor, Tensor) {
    let real: Vec<f32> =
        (0..n * 32 * 32).map(|i| (((i as u64 * 31 + step * 7 + rank as u64 * 13) % 97) as f32 / 48.0) - 1.0).collect();
    let z = kernels::rng::noise(5, rank as u64, step, n, 8);
    (Tensor::new(vec![n, 1, 32, 32], real).unwrap(), z)
}

/// Trains `world` thread-ranks for `steps` steps, rank r voting `votes(r, step)`; returns each
/// rank's checksum and the vote means it saw.
fn train(world: usize, steps: u64, votes: fn(usize, u64) -> f32) -> Vec<(u64, Vec<f32>)> {
    let group = shared(world);
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let shared = group.clone();
            std::thread::spawn(move || {
                let mut gan = Gan::new(cfg(), OptimConfig::default(), 3).unwrap();
                let mut coll = ThreadCollective { rank, world, shared };
                // Rank 0 has a smaller batch, so the gradient weights are not 1 and the vote
                // must escape the weighting.
                let n = if rank == 0 { 3 } else { 4 };
                let global = 3 + 4 * (world - 1);
                let grad_weight = (n * world) as f32 / global as f32;
                let seen: Vec<f32> = (0..steps)
                    .map(|step| {
                        let (real, z) = batch(rank, step, n);
                        let share = StepShare { grad_weight, vote: votes(rank, step) };
                        gan.train_step(&real, &z, share, &mut coll).unwrap().vote
                    })
                    .collect();
                (gan.parameter_checksum(), seen)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn every_rank_sees_the_mean_of_the_votes_and_the_step_is_unchanged() {
    let quiet = train(3, 3, |_, _| 0.0);
    let voting = train(3, 3, |rank, step| if rank == 1 && step == 1 { 4.0 } else { 0.0 });
    for (rank, ((quiet_sum, quiet_votes), (sum, votes))) in quiet.iter().zip(&voting).enumerate() {
        assert_eq!(quiet_votes, &vec![0.0; 3], "rank {rank}");
        assert_eq!(votes[0], 0.0, "rank {rank}");
        assert!((votes[1] - 4.0 / 3.0).abs() < 1e-6, "rank {rank} saw {}", votes[1]);
        assert_eq!(votes[2], 0.0, "rank {rank}: a vote lasts one step");
        assert_eq!(quiet_sum, sum, "rank {rank}: the vote changed the model");
    }
    assert!(voting.windows(2).all(|w| w[0].0 == w[1].0), "the ranks agree on the model");
}

#[test]
fn one_rank_gets_its_own_vote_back() {
    let mut gan = Gan::new(cfg(), OptimConfig::default(), 3).unwrap();
    let mut plain = gan.clone();
    let (real, z) = batch(0, 0, 4);
    let stats = gan.train_step(&real, &z, StepShare { grad_weight: 1.0, vote: 1.0 }, &mut SingleProcess).unwrap();
    assert_eq!(stats.vote, 1.0);
    let plain_stats = plain.train_step(&real, &z, 1.0, &mut SingleProcess).unwrap();
    assert_eq!((plain_stats.vote, plain_stats.loss_d), (0.0, stats.loss_d));
    assert_eq!(plain.parameter_checksum(), gan.parameter_checksum());
}
