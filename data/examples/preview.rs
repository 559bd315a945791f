//! Writes the first 64 samples of a dataset as an 8x8 grid, to eyeball a loader:
//! `cargo run -p data --example preview -- SPEC [SIZE] [OUT.png]`, e.g.
//! `cifar10:../shared/data/cifar-10 64 /tmp/cifar.png`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let spec: data::DatasetSpec = args.next().unwrap_or_else(|| "shapes".into()).parse()?;
    let size: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "preview.png".into()));
    let d = spec.load(size, Some(64))?;
    data::save_grid(&out, &d.pixels, d.len, d.nc, d.image_size, 8)?;
    println!("{spec}: {} samples of {}x{size}x{size} -> {}", d.len, d.nc, out.display());
    Ok(())
}
