//! Llama-family safetensors models (float weights) through candle-transformers' `llama`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig, LlamaEosToks};

use super::{CausalLm, Sequence};
use crate::error::{Error, Result, read_json};
use crate::model::LoadedModel;

struct SafetensorsLlama {
    model: std::sync::Arc<Llama>,
    config: Config,
    dtype: DType,
    device: Device,
}

struct LlamaSequence {
    model: std::sync::Arc<Llama>,
    device: Device,
    cache: Cache,
    len: usize,
}

impl CausalLm for SafetensorsLlama {
    fn new_sequence(&self) -> Result<Box<dyn Sequence>> {
        let cache = Cache::new(true, self.dtype, &self.config, &self.device)?;
        Ok(Box::new(LlamaSequence {
            model: self.model.clone(),
            device: self.device.clone(),
            cache,
            len: 0,
        }))
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }
}

impl Sequence for LlamaSequence {
    fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(Error::InvalidRequest("no tokens to feed".into()));
        }
        let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let logits = self.model.forward(&input, self.len, &mut self.cache)?;
        self.len += tokens.len();
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    }
    fn len(&self) -> usize {
        self.len
    }
    fn fork(&self) -> Option<Box<dyn Sequence>> {
        // candle's cache holds tensors that a step replaces rather than writes into, so the
        // copy shares them safely.
        Some(Box::new(LlamaSequence {
            model: self.model.clone(),
            device: self.device.clone(),
            cache: self.cache.clone(),
            len: self.len,
        }))
    }
}

pub(super) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Model(format!(
            "{} has no .safetensors file",
            dir.display()
        )));
    }
    Ok(files)
}

pub(super) fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let raw: serde_json::Value = read_json(&dir.join("config.json"))?;
    // Refuse what candle's llama does not implement rather than computing something else.
    if raw.get("attention_bias").and_then(|v| v.as_bool()) == Some(true)
        || raw.get("mlp_bias").and_then(|v| v.as_bool()) == Some(true)
    {
        return Err(Error::Model(
            "llama with attention or MLP biases is not supported".into(),
        ));
    }
    let mut cfg_json = raw.clone();
    // transformers 5 writes rope_theta inside rope_parameters; older files at the top level.
    if cfg_json.get("rope_theta").is_none()
        && let Some(theta) = raw.pointer("/rope_parameters/rope_theta")
    {
        cfg_json["rope_theta"] = theta.clone();
    }
    let lcfg: LlamaConfig = serde_json::from_value(cfg_json).map_err(|source| Error::Json {
        path: dir.join("config.json").display().to_string(),
        source,
    })?;
    if let Some(hd) = raw.get("head_dim").and_then(|v| v.as_u64())
        && hd as usize * lcfg.num_attention_heads != lcfg.hidden_size
    {
        return Err(Error::Model(
            "llama with head_dim * heads != hidden_size is not supported".into(),
        ));
    }
    let config = lcfg.into_config(false);
    let vb = super::layers::var_builder(dir, dtype, device)?;
    let model = Llama::load(vb, &config).map_err(|e| super::layers::weights_error(dir, e))?;

    let tokenizer = super::tokenizer_json(dir)?;
    super::layers::check_vocab(&tokenizer, config.vocab_size)?;
    let tcfg = super::read_tokenizer_config(dir)?;
    let chat_template = tcfg
        .as_ref()
        .map(super::chat_template_from_config)
        .transpose()?
        .flatten();
    let mut eos_ids: Vec<u32> = match &config.eos_token_id {
        Some(LlamaEosToks::Single(i)) => vec![*i],
        Some(LlamaEosToks::Multiple(v)) => v.clone(),
        None => Vec::new(),
    };
    if let Some(eos) = tcfg
        .as_ref()
        .and_then(|c| super::special_token(c, "eos_token"))
        && let Some(id) = tokenizer.token_to_id(&eos)
        && !eos_ids.contains(&id)
    {
        eos_ids.push(id);
    }
    // The tokenizer.json post-processor adds BOS itself when the model wants one.
    let bos = config.bos_token_id;
    let lm = SafetensorsLlama {
        model: std::sync::Arc::new(model),
        config,
        dtype,
        device: device.clone(),
    };
    Ok(super::generation_model(
        Box::new(lm),
        tokenizer,
        chat_template,
        eos_ids,
        bos,
        false,
    ))
}
