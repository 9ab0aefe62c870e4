"""The hosted model behind an OpenAI-compatible API: the only package that knows HTTP shapes."""
