"""Vocabularies as bytes (Hugging Face and tiktoken) and the byte aligner between tokenizers."""
