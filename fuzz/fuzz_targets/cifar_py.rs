#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| dcgan_fuzz::cifar_py(bytes));
