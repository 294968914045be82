"""One module per diagnostic; each reduces tensors to a `gradlens.results` model."""
