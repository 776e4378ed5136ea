#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walagent_fuzz::entries::target(data));
