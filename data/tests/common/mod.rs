//! Writers for small dataset files, so tests never depend on downloaded data.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub enum Compress {
    Plain,
    Gzip,
    Xz,
}

pub fn write_bytes(path: &Path, data: &[u8], how: Compress) {
    let bytes = match how {
        Compress::Plain => data.to_vec(),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compress::Xz => {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
    };
    std::fs::write(path, bytes).unwrap();
}

/// Pixel `p` of image `k` in test IDX files.
pub fn idx_pixel(k: usize, p: usize) -> u8 {
    ((k * 31 + p * 7) % 256) as u8
}

/// IDX images bytes with `count` declared images of `rows x cols` and `present` actually written.
pub fn idx_images(count: u32, rows: u32, cols: u32, present: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [2051u32, count, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    let rc = (rows * cols) as usize;
    for k in 0..present {
        v.extend((0..rc).map(|p| idx_pixel(k, p)));
    }
    v
}

pub fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&2049u32.to_be_bytes());
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Byte of channel `c`, pixel `p` of CIFAR record `k`.
pub fn cifar_pixel(k: usize, c: usize, p: usize) -> u8 {
    ((k * 13 + c * 85 + p * 3) % 256) as u8
}

/// `n` CIFAR records numbered from `first`; label = record number % 10.
pub fn cifar_records(first: usize, n: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for k in first..first + n {
        v.push((k % 10) as u8);
        for c in 0..3 {
            v.extend((0..1024).map(|p| cifar_pixel(k, c, p)));
        }
    }
    v
}

pub fn unit(b: u8) -> f32 {
    b as f32 / 255.0 * 2.0 - 1.0
}
