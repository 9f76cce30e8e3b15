"""Run folders (config, manifest, metrics, summary), lineage between runs, and W&B mirroring."""
