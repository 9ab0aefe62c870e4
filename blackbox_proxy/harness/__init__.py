"""Demo and measurement harness: embedded models, the arithmetic task, server launchers,
interop workloads and fidelity reports. It imports the product; the product never imports it
(the CLI's ``demo`` and ``compare`` commands load it on demand)."""
