"""Config schema (dataclasses in Hydra's ConfigStore), cross-field validation and error messages."""
