//! Placeholder until the GGUF tokenizer lands.
pub fn tokenizer_from_gguf(
    _content: &candle_core::quantized::gguf_file::Content,
) -> anyhow::Result<tokenizers::Tokenizer> {
    anyhow::bail!("GGUF tokenizers are not supported yet")
}
