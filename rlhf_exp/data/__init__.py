"""Data: the embedded task (with its gold reward), hub and local loaders, and format adapters."""
