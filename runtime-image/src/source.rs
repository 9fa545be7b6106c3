//! Where a model comes from: a local path, or a repository on a Hugging Face hub.
//!
//! `--model` takes either a path (a model directory or a `.gguf` file) or
//! `hf://<repo>[:<quant>][@<revision>][/<file>]`:
//! - `<repo>` is `org/name` (or a bare `name`, as the hub still accepts for old repos);
//! - `<quant>` picks the repo's GGUF file of that quantisation, as llama.cpp's `-hf
//!   org/repo:Q4_K_M` and Ollama's `hf.co/org/repo:Q4_K_M` do ([`crate::hub::select_files`]);
//! - `<revision>` is a branch, a tag or a commit (default `main`); `refs/pr/<n>` and
//!   `refs/convert/<x>` keep their slashes;
//! - `<file>` names one file of the repo (a GGUF), possibly in a folder; `--file` does the same.
//!
//! Without `@`, the first two segments are the repo (`hf://org/name/model.gguf`), so a bare
//! single-segment repo with a file needs an explicit revision (`hf://gpt2@main/x.gguf`).
//! Parsing is pure; [`crate::hub`] turns a [`HubModel`] into files on disk.

use std::fmt;
use std::path::{Path, PathBuf};

/// A model source as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local model directory or GGUF file.
    Local(PathBuf),
    /// A repository on the hub.
    Hub(HubModel),
}

/// A model on the hub: a repository at a revision, optionally one file of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubModel {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
    /// A quantisation tag (`Q4_K_M`) choosing one of the repo's GGUF files; never with `file`.
    pub quant: Option<String>,
}

impl fmt::Display for HubModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf://{}", self.repo)?;
        if let Some(q) = &self.quant {
            write!(f, ":{q}")?;
        }
        write!(f, "@{}", self.revision)?;
        if let Some(file) = &self.file {
            write!(f, "/{file}")?;
        }
        Ok(())
    }
}

impl HubModel {
    /// True when the revision is a full commit sha (what the operator pins).
    pub fn revision_is_commit(&self) -> bool {
        is_commit(&self.revision)
    }
}

/// A 40-hex git commit id.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl ModelSource {
    /// Parses `--model` together with `--file`. A file named both ways must agree.
    pub fn parse(model: &str, file: Option<&str>) -> Result<ModelSource, String> {
        let Some(rest) = model.strip_prefix("hf://") else {
            if let Some(f) = file {
                // A local directory with --file: the file inside it.
                check_file(f)?;
                return Ok(ModelSource::Local(Path::new(model).join(f)));
            }
            return Ok(ModelSource::Local(PathBuf::from(model)));
        };
        let mut hub =
            parse_hub(rest).map_err(|e| format!("invalid model source {model:?}: {e}"))?;
        if let Some(f) = file {
            check_file(f).map_err(|e| format!("invalid --file {f:?}: {e}"))?;
            if let Some(q) = &hub.quant {
                return Err(format!(
                    "{model:?} picks the quantisation {q:?} and --file names {f:?}: give one"
                ));
            }
            match &hub.file {
                Some(inline) if inline != f => {
                    return Err(format!(
                        "{model:?} names the file {inline:?} but --file says {f:?}"
                    ));
                }
                _ => hub.file = Some(f.to_owned()),
            }
        }
        Ok(ModelSource::Hub(hub))
    }
}

fn parse_hub(rest: &str) -> Result<HubModel, String> {
    let (repo, revision, file) = match rest.split_once('@') {
        Some((repo, after)) => {
            let segments: Vec<&str> = after.split('/').collect();
            // refs/pr/1 and refs/convert/parquet are revisions with slashes.
            let rev_len = if segments.first() == Some(&"refs") {
                3
            } else {
                1
            };
            if segments.len() < rev_len {
                return Err(format!("incomplete revision {after:?}"));
            }
            let revision = segments[..rev_len].join("/");
            let file = segments[rev_len..].join("/");
            (repo.to_owned(), revision, file)
        }
        None => {
            let segments: Vec<&str> = rest.split('/').collect();
            let n = segments.len().min(2);
            (
                segments[..n].join("/"),
                "main".to_owned(),
                segments[n..].join("/"),
            )
        }
    };
    let (repo, quant) = match repo.split_once(':') {
        Some((r, q)) => {
            check_quant(q)?;
            (r.to_owned(), Some(q.to_owned()))
        }
        None => (repo, None),
    };
    check_repo(&repo)?;
    if quant.is_some() && !file.is_empty() {
        return Err(format!(
            "a quantisation tag and a file ({file:?}) both name the file: give one"
        ));
    }
    if revision.is_empty() || revision.split('/').any(|s| s.is_empty() || s == "..") {
        return Err(format!("invalid revision {revision:?}"));
    }
    let file = if file.is_empty() {
        None
    } else {
        check_file(&file)?;
        Some(file)
    };
    Ok(HubModel {
        repo,
        revision,
        file,
        quant,
    })
}

/// A quantisation tag: letters, digits, `_`, `-`, `.` (`Q4_K_M`, `IQ4_XS`, `f16`).
fn check_quant(q: &str) -> Result<(), String> {
    if q.is_empty()
        || !q
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "invalid quantisation tag {q:?} (letters, digits, '-', '_', '.', e.g. Q4_K_M)"
        ));
    }
    Ok(())
}

fn check_repo(repo: &str) -> Result<(), String> {
    let segments: Vec<&str> = repo.split('/').collect();
    let ok_segment = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if segments.len() > 2 || !segments.iter().all(|s| ok_segment(s)) {
        return Err(format!(
            "invalid repository {repo:?} (expected org/name of letters, digits, '-', '_', '.')"
        ));
    }
    Ok(())
}

/// A repo-relative file path: no absolute paths, no `..`, no empty segments.
fn check_file(file: &str) -> Result<(), String> {
    if file.starts_with('/')
        || file
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(format!("invalid file path {file:?} (relative, no '..')"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(s: &str) -> HubModel {
        match ModelSource::parse(s, None).unwrap() {
            ModelSource::Hub(h) => h,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    fn hm(repo: &str, revision: &str, file: Option<&str>) -> HubModel {
        HubModel {
            repo: repo.into(),
            revision: revision.into(),
            file: file.map(Into::into),
            quant: None,
        }
    }

    #[test]
    fn a_quantisation_tag_follows_the_repo() {
        let tagged = |repo: &str, rev: &str, q: &str| HubModel {
            quant: Some(q.into()),
            ..hm(repo, rev, None)
        };
        assert_eq!(
            hub("hf://bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
            tagged("bartowski/Llama-3.2-1B-Instruct-GGUF", "main", "Q4_K_M")
        );
        assert_eq!(
            hub("hf://org/repo:q8_0@v1"),
            tagged("org/repo", "v1", "q8_0")
        );
        assert_eq!(
            hub("hf://org/repo:IQ4_XS@main").to_string(),
            "hf://org/repo:IQ4_XS@main"
        );
        for bad in [
            "hf://org/repo:",
            "hf://org/repo:Q4 K",
            "hf://org/repo:Q4_K_M/x.gguf",
            "hf://org/repo:Q4_K_M@main/x.gguf",
            "hf://org/repo:a:b",
        ] {
            assert!(ModelSource::parse(bad, None).is_err(), "{bad} was accepted");
        }
        let err = ModelSource::parse("hf://org/repo:Q4_K_M", Some("x.gguf")).unwrap_err();
        assert!(err.contains("give one"), "{err}");
    }

    #[test]
    fn a_hub_source_names_repo_revision_and_file() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            hub(&format!("hf://org/repo@{sha}")),
            hm("org/repo", sha, None)
        );
        assert_eq!(
            hub("hf://org/repo@v1.0/sub/model.Q4_1.gguf"),
            hm("org/repo", "v1.0", Some("sub/model.Q4_1.gguf"))
        );
        assert_eq!(hub("hf://org/repo"), hm("org/repo", "main", None));
        assert_eq!(
            hub("hf://org/repo/model.gguf"),
            hm("org/repo", "main", Some("model.gguf"))
        );
        assert_eq!(
            hub("hf://gpt2@main/x.gguf"),
            hm("gpt2", "main", Some("x.gguf"))
        );
        assert_eq!(hub("hf://gpt2"), hm("gpt2", "main", None));
        assert!(hub(&format!("hf://org/repo@{sha}")).revision_is_commit());
        assert!(!hub("hf://org/repo@main").revision_is_commit());
    }

    #[test]
    fn pull_request_revisions_keep_their_slashes() {
        assert_eq!(
            hub("hf://org/repo@refs/pr/12/model.gguf"),
            hm("org/repo", "refs/pr/12", Some("model.gguf"))
        );
        assert!(ModelSource::parse("hf://org/repo@refs/pr", None).is_err());
    }

    #[test]
    fn the_file_flag_fills_in_or_must_agree_with_the_source() {
        let s = ModelSource::parse("hf://org/repo@main", Some("a.gguf")).unwrap();
        assert_eq!(s, ModelSource::Hub(hm("org/repo", "main", Some("a.gguf"))));
        assert!(ModelSource::parse("hf://org/repo@main/a.gguf", Some("a.gguf")).is_ok());
        let err = ModelSource::parse("hf://org/repo@main/a.gguf", Some("b.gguf")).unwrap_err();
        assert!(err.contains("--file"), "{err}");
    }

    #[test]
    fn malformed_hub_sources_are_refused() {
        for bad in [
            "hf://",
            "hf://@main",
            "hf://org/repo@",
            "hf://a/b/c@main",
            "hf://org/re po@main",
            "hf://org/repo@main/../etc/passwd",
            "hf://org/repo@main//x",
            "hf://../x@main",
        ] {
            assert!(ModelSource::parse(bad, None).is_err(), "{bad} was accepted");
        }
        assert!(ModelSource::parse("hf://org/repo", Some("../x.gguf")).is_err());
    }

    #[test]
    fn a_path_is_a_local_source() {
        assert_eq!(
            ModelSource::parse("/models/m.gguf", None).unwrap(),
            ModelSource::Local("/models/m.gguf".into())
        );
        assert_eq!(
            ModelSource::parse("/models/dir", Some("m.gguf")).unwrap(),
            ModelSource::Local("/models/dir/m.gguf".into())
        );
    }

    #[test]
    fn a_hub_source_prints_as_it_parses() {
        let s = "hf://org/repo@refs/pr/1/a/b.gguf";
        assert_eq!(hub(s).to_string(), s);
    }
}
