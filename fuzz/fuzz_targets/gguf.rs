#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cmrm_fuzz::gguf(data));
