"""Small local models (expert, anti-expert): the forward engine, loading, sessions, batching."""
