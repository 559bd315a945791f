//! Times loading a dataset: `cargo run --release -p data --example load_bench -- SPEC [SIZE] [REPEATS]`
//! e.g. `mnist:../shared/data/mnist 64 3`. Prints the time of each load.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let spec: data::DatasetSpec = args.next().unwrap_or_else(|| "shapes".into()).parse()?;
    let size: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let repeats: usize = args.next().map_or(Ok(3), |s| s.parse())?;
    println!("{spec} at {size}x{size}, {} rayon threads", rayon::current_num_threads());
    for _ in 0..repeats {
        let t = Instant::now();
        let d = spec.load(size, None)?;
        println!("{} samples of {}x{size}x{size} in {:.3} s", d.len, d.nc, t.elapsed().as_secs_f64());
    }
    Ok(())
}
