"""Decoding strategies: state machines that ask for hosted requests and observe answers (no I/O)."""
