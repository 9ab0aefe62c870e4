"""Front ends: the CLI, batch runs and the two OpenAI-compatible servers."""
